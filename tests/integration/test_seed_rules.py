"""The seed's 11 rules against the seed's data, through the operator's commands."""

from __future__ import annotations

import re

import psycopg
import pytest

from iothub import exitcodes
from iothub.cli import main as cli


def test_seeded_rules_are_valid_and_backtests_match_the_seeded_events(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rules check` accepts all 11 seeded rules, and replaying each over the seeded history
    triggers exactly as often as the seed's sample events say."""
    monkeypatch.setenv("IOTHUB_DATABASE_URL", db_url)
    monkeypatch.setenv("IOTHUB_LOG_FORMAT", "json")
    assert cli.main(["seed"]) == exitcodes.OK
    capsys.readouterr()
    assert cli.main(["rules", "check"]) == exitcodes.OK
    assert "11 ok, 0 invalid" in capsys.readouterr().out
    with psycopg.connect(db_url, autocommit=True) as conn:
        rule_ids = [r[0] for r in conn.execute("SELECT id FROM rules ORDER BY id")]
        seeded: dict[int, int] = dict(
            conn.execute(
                "SELECT rule_id, count(*) FROM events WHERE kind = 'triggered' GROUP BY 1"
            ).fetchall()
        )
    assert len(rule_ids) == 11
    replayed = {}
    for rule_id in rule_ids:
        assert cli.main(["rules", "backtest", "--rule", str(rule_id)]) == exitcodes.OK
        summary = re.search(r"\((\d+) triggered, (\d+) resolved\)", capsys.readouterr().out)
        assert summary, f"no summary line for rule {rule_id}"
        if int(summary.group(1)):
            replayed[rule_id] = int(summary.group(1))
    assert replayed == seeded
    assert sum(seeded.values()) == 8
