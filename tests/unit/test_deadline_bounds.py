"""How a group commit's and a read's deadlines become database bounds (pure parts)."""

from __future__ import annotations

import pytest

from services.common import db
from services.ingest.commits import latest_remaining


def test_latest_remaining_group_with_deadlines_bounded_by_latest() -> None:
    assert latest_remaining([10.2, 10.5, 10.3], now=10.0) == pytest.approx(0.5)


def test_latest_remaining_one_caller_without_deadline_unbounded() -> None:
    assert latest_remaining([10.2, None], now=10.0) is None


def test_latest_remaining_all_deadlines_passed_zero_not_negative() -> None:
    assert latest_remaining([9.0, 9.5], now=10.0) == 0.0


def test_deadline_ms_adds_grace_so_grpc_answers_first() -> None:
    assert db._deadline_ms(0.2) == round((0.2 + db.DEADLINE_GRACE_SECONDS) * 1000)


def test_deadline_ms_passed_deadline_still_positive() -> None:
    # 0 would mean "no timeout" to PostgreSQL.
    assert db._deadline_ms(-1.0) >= 1


def test_interrupt_requested_later_checks_raise() -> None:
    interrupt = db.Interrupt()
    interrupt.check()
    interrupt.request()
    assert interrupt.requested
    with pytest.raises(db.Interrupted):
        interrupt.check()
