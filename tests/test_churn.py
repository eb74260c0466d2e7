"""The churn world: a seeded customer database, the documented churn rule, the reviewer's rules,
the rubric, its tools, and the baseline and the embedded model run through the runtime."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import pytest

from agentrt import Runtime, ScriptedModel
from agentrt.environments import run_environment
from agentrt.environments.churn import (MAX_EMAIL_CHARS, RISK_THRESHOLD, ChurnWorld, Customer, Strategy, draft,
                                        review, risk_points, rubric)
from agentrt.tools import ToolRegistry

ADA = Customer(id=7, name="Ada Lopez", segment="smb", plan="pro", tenure_months=4, monthly_spend=490.0,
               last_login_days=40, tickets_90d=3, nps=3, feature_usage_pct=20, payment_failures_90d=1,
               region="north")


def dump(world: ChurnWorld) -> list[str]:
    conn = sqlite3.connect(world.db_path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_the_database_is_deterministic_per_seed(tmp_path):
    a, b, c = ChurnWorld(60, workdir=tmp_path / "a"), ChurnWorld(60, workdir=tmp_path / "b"), ChurnWorld(60)
    a.reset(3), b.reset(3), c.reset(4)
    assert dump(a) == dump(b) and a.customers == b.customers
    assert dump(a) != dump(c)
    a.reset(3)  # resetting again rewrites the same file
    assert dump(a) == dump(b)


def test_labels_follow_the_documented_rule_and_stay_out_of_the_database():
    world = ChurnWorld(200)
    world.reset(0)
    customers = world.customers.values()
    assert all(c.at_risk == (risk_points(c) + c.noise >= RISK_THRESHOLD) for c in customers)
    assert {c.noise for c in customers} == {-1, 0, 1}
    share = sum(c.at_risk for c in customers) / len(customers)
    assert 0.1 < share < 0.45
    conn = sqlite3.connect(world.db_path)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(customers)")]
    assert not {"at_risk", "noise", "label", "risk"} & set(columns)
    recent = dict(conn.execute("SELECT customer_id, COUNT(*) FROM tickets WHERE julianday('2025-06-30') - "
                               "julianday(opened) < 90 GROUP BY customer_id").fetchall())
    idle = dict(conn.execute("SELECT id, CAST(julianday('2025-06-30') - julianday(last_login) AS INTEGER) "
                             "FROM customers").fetchall())
    conn.close()
    assert all(recent.get(c.id, 0) == c.tickets_90d and idle[c.id] == c.last_login_days for c in customers)


def test_risk_points_and_playbook_on_a_hand_built_customer():
    assert risk_points(ADA) == 2 + 2 + 2 + 1 + 1 + 1
    calm = dataclasses.replace(ADA, last_login_days=2, tickets_90d=0, nps=None, tenure_months=30,
                               payment_failures_90d=0, feature_usage_pct=80)
    assert risk_points(calm) == 0 and not calm.at_risk
    assert risk_points(dataclasses.replace(calm, last_login_days=15, nps=6, tickets_90d=2)) == 3
    assert ADA.ideal is Strategy.feature_training
    assert dataclasses.replace(ADA, segment="enterprise").ideal is Strategy.personal_call
    assert dataclasses.replace(ADA, tickets_90d=1).ideal is Strategy.plan_downgrade
    assert dataclasses.replace(ADA, tickets_90d=1, plan="basic").ideal is Strategy.discount


def test_the_reviewer_approves_a_fitting_email_and_explains_each_rejection():
    good = draft("Ada", "pro", Strategy.feature_training)
    assert review(ADA, Strategy.feature_training, good) == []
    for strategy in (Strategy.discount, Strategy.plan_downgrade, Strategy.personal_call):
        assert review(ADA, strategy, draft("Ada", "pro", strategy)) == []

    def why(customer: Customer, strategy: Strategy, email: str) -> str:
        reasons = review(customer, strategy, email)
        assert len(reasons) == 1, reasons
        return reasons[0]

    assert "first name 'Ada'" in why(ADA, Strategy.feature_training, good.replace("Ada", "there"))
    assert "placeholder '{first_name}'" in why(ADA, Strategy.feature_training, good + " {first_name}")
    assert "too long" in why(ADA, Strategy.feature_training, good + " " * MAX_EMAIL_CHARS)
    assert "does not make the discount offer" in why(ADA, Strategy.discount, good.replace("training", "chat"))
    assert "also offers discount" in why(ADA, Strategy.feature_training, good + " Plus 10% off!")
    assert "consumer" in why(dataclasses.replace(ADA, segment="consumer"), Strategy.personal_call,
                             draft("Ada", "pro", Strategy.personal_call))
    assert "enterprise" in why(dataclasses.replace(ADA, segment="enterprise"), Strategy.discount,
                               draft("Ada", "pro", Strategy.discount))
    assert "basic plan" in why(dataclasses.replace(ADA, plan="basic"), Strategy.plan_downgrade,
                               draft("Ada", "pro", Strategy.plan_downgrade))
    assert review(ADA, Strategy.discount, "  ") == ["the email is empty"]


def test_the_rubric_on_hand_built_outcomes():
    at_risk = set(range(1, 11))
    ideal = {i: Strategy.discount for i in range(1, 41)}
    perfect = rubric(at_risk, ideal, {i: Strategy.discount for i in at_risk}, reviewed=10, approved=10)
    assert perfect.total == pytest.approx(1.0)
    empty = rubric(at_risk, ideal, {}, reviewed=0, approved=0)
    assert empty.total == 0.0 and empty.spam == 0.0
    spammy = rubric(at_risk, ideal, {i: Strategy.discount for i in range(1, 41)}, reviewed=40, approved=40)
    assert spammy.spam == pytest.approx(0.75) and spammy.total < 0.3
    # half the at-risk found, 3 of those 5 with the playbook's strategy, one rejection on the way
    half = {i: Strategy.discount if i <= 3 else Strategy.personal_call for i in range(1, 6)}
    partial = rubric(at_risk, ideal, half, reviewed=6, approved=5)
    assert (partial.precision, partial.recall, partial.fit) == (1.0, 0.5, 0.3)
    assert partial.total == pytest.approx(0.5 * (2 / 3) + 0.3 * 0.3 + 0.2 * 5 / 6)
    careless = rubric(at_risk, ideal, {i: Strategy.discount for i in at_risk}, reviewed=30, approved=10)
    assert perfect.total > careless.total > partial.total


def call(registry: ToolRegistry, name: str, **arguments):
    return asyncio.run(registry.dispatch({"id": "c", "name": name, "arguments": arguments}))


def test_submit_reviews_revisions_limits_and_finish():
    world = ChurnWorld(30, max_attempts=2)
    (seat,) = world.reset(1)
    tools = ToolRegistry(seat.tools)
    c = world.customers[5]
    strategy = Strategy.feature_training
    bad = call(tools, "submit", customer_id=5, strategy=strategy.value, email="Hello, we miss you.")
    assert bad.ok and not bad.value["approved"] and bad.value["attempts_left"] == 1
    assert any(c.first_name in reason for reason in bad.value["reasons"])
    good = call(tools, "submit", customer_id=5, strategy=strategy.value, email=draft(c.first_name, c.plan, strategy))
    assert good.value["approved"] and world.contacts == {5: strategy}
    again = call(tools, "submit", customer_id=5, strategy=strategy.value, email="x")
    assert again.error == "tool_error" and "already has an approved" in again.content
    assert "withdrawn" in call(tools, "submit", customer_id=5, strategy="none", email="").value["message"]
    assert world.contacts == {}
    assert "all 2 review attempts" in call(tools, "submit", customer_id=5, strategy="discount", email="x").content
    assert "ids run from 1 to 30" in call(tools, "submit", customer_id=99, strategy="discount", email="x").content
    assert call(tools, "submit", customer_id=6, strategy="refund", email="x").error == "invalid_arguments"
    assert "1 row" in call(tools, "sql", query="SELECT COUNT(*) FROM customers").content
    assert "read-only" in call(tools, "sql", query="DELETE FROM customers").content
    assert (world.reviewed, world.approved, world.done) == (2, 1, False)
    assert call(tools, "finish").ok and world.done
    assert "finished" in call(tools, "submit", customer_id=6, strategy="discount", email="x").content


def test_the_baseline_through_the_runtime_scores_high():
    world = ChurnWorld()

    async def main():
        async with Runtime(model=ScriptedModel(lambda messages, tools: "done")) as rt:
            return await run_environment(rt, world, seed=0, policy="baseline")

    (result,) = asyncio.run(main())
    assert result.status == "done", result.error
    assert world.done and result.rewards["churn"] == world.reward("analyst") >= 0.9
    score = world.score()
    assert score.approval == 1.0 and score.precision > 0.9 and score.recall > 0.9
    with pytest.raises(KeyError, match="one seat"):
        world.reward("nobody")
