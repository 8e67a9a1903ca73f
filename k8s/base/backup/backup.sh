#!/bin/sh
# Dump one database into $BACKUP_DIR in pg_dump's custom format (compressed; pg_restore can restore
# it whole or in parts), then keep only the newest $BACKUP_KEEP dumps (default 7).
# Run by the db-backup CronJob; tests/integration/test_k8s.py runs it against a real PostgreSQL.
#
#   BACKUP_DIR   folder of the dumps (a PersistentVolume in the cluster)
#   BACKUP_KEEP  how many dumps to keep
#   PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE   the connection, read by libpq itself
#
# Dumps are named <database>-<UTC time>.dump, e.g. mt5mesh-20251020T021500Z.dump, so that sorting the
# names sorts them by time.
set -eu

: "${BACKUP_DIR:?BACKUP_DIR must name the folder of the dumps}"
: "${PGDATABASE:?PGDATABASE must name the database to dump}"
keep="${BACKUP_KEEP:-7}"
case "$keep" in
    '' | *[!0-9]* | 0)
        echo "BACKUP_KEEP must be a positive whole number, got '$keep'" >&2
        exit 2
        ;;
esac

stamp=$(date -u +%Y%m%dT%H%M%SZ)
final="$BACKUP_DIR/$PGDATABASE-$stamp.dump"
partial="$BACKUP_DIR/.$PGDATABASE-$stamp.dump.partial"
# The dump is written under a hidden name and renamed once complete: a dump cut short (pod killed,
# volume full) is never taken for a backup, neither by the retention below nor by restore.sh.
trap 'rm -f "$partial"' EXIT
pg_dump --format=custom --file="$partial"
mv "$partial" "$final"
echo "backup written: $final ($(wc -c <"$final") bytes)"

# Retention: newest first, everything after the first $keep goes.
ls -1 "$BACKUP_DIR" | grep -E "^$PGDATABASE-[0-9]{8}T[0-9]{6}Z\.dump\$" | sort -r | tail -n "+$((keep + 1))" |
    while IFS= read -r old; do
        rm -f -- "${BACKUP_DIR:?}/$old"
        echo "removed old backup: $old"
    done
