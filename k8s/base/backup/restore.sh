#!/bin/sh
# Restore a dump made by backup.sh into a NEW database. It never touches an existing database: the
# live one stays as it is until an operator switches to the restored copy (see k8s/README.md).
# Run by a Job made from the db-restore CronJob; tests/integration/test_k8s.py runs it against a
# real PostgreSQL.
#
#   RESTORE_DATABASE  the database to create and fill (letters, digits and _ only)
#   RESTORE_FILE      the dump to restore; if empty, the newest $PGDATABASE-*.dump in $BACKUP_DIR
#   BACKUP_DIR        folder of the dumps
#   PGHOST, PGPORT, PGUSER, PGPASSWORD   the connection, read by libpq itself; PGDATABASE names
#                     the database the dumps were taken from
set -eu

: "${RESTORE_DATABASE:?RESTORE_DATABASE must name the database to create}"
case "$RESTORE_DATABASE" in
    *[!A-Za-z0-9_]*)
        echo "RESTORE_DATABASE may hold letters, digits and _ only, got '$RESTORE_DATABASE'" >&2
        exit 2
        ;;
esac

file="${RESTORE_FILE:-}"
if [ -z "$file" ]; then
    : "${BACKUP_DIR:?BACKUP_DIR must name the folder of the dumps}"
    : "${PGDATABASE:?PGDATABASE must name the database the dumps were taken from}"
    newest=$(ls -1 "$BACKUP_DIR" | grep -E "^$PGDATABASE-[0-9]{8}T[0-9]{6}Z\.dump\$" | sort | tail -n 1 || true)
    if [ -z "$newest" ]; then
        echo "no dump of $PGDATABASE in $BACKUP_DIR" >&2
        exit 1
    fi
    file="$BACKUP_DIR/$newest"
fi
# Read the archive's table of contents first: a damaged file fails here, before anything is created.
contents=$(pg_restore --list "$file")

# createdb fails when the database exists, so nothing is ever overwritten.
createdb --maintenance-db=postgres "$RESTORE_DATABASE"
restored=no
# On failure, drop the half-filled database this run created, so a retry starts clean.
trap 'if [ "$restored" = no ]; then dropdb --maintenance-db=postgres --if-exists "$RESTORE_DATABASE"; fi' EXIT

timescale=no
if printf '%s\n' "$contents" | grep -q ' EXTENSION - timescaledb'; then
    timescale=yes
fi
if [ "$timescale" = yes ]; then
    # TimescaleDB's restore procedure: pre_restore pauses its background jobs and lets pg_restore
    # write its catalog tables; post_restore ends that. Server and dump need the same extension version.
    psql -X -v ON_ERROR_STOP=1 --dbname="$RESTORE_DATABASE" \
        -c "CREATE EXTENSION IF NOT EXISTS timescaledb" -c "SELECT timescaledb_pre_restore()"
fi
# One transaction: the restore is complete or nothing of it is there.
pg_restore --single-transaction --no-owner --dbname="$RESTORE_DATABASE" "$file"
if [ "$timescale" = yes ]; then
    psql -X -v ON_ERROR_STOP=1 --dbname="$RESTORE_DATABASE" -c "SELECT timescaledb_post_restore()"
fi
restored=yes
echo "restored $file into database $RESTORE_DATABASE"
