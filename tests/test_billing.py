"""usage/billing.py against hand-computed invoices (each tier), the seed's 100-tenant scenario, and `o7s bill`/`o7s usage`."""

from __future__ import annotations

import csv
import io
import json
import uuid
from decimal import Decimal as D

import psycopg
import pytest

from conftest import run_o7s
from o7s_cluster.usage.billing import (
    SEED_TIERS, OrgUsage, allocate, build_bill, gross_margin, invoice, metered_cost, month_bounds,
)
from o7s_cluster.usage.records import estimate

T = SEED_TIERS


# ---------------------------------------------------------------------------------------------- invoices


def test_free_within_included():
    inv = invoice(OrgUsage("f", "free", D("3"), D("8")), T["free"], "2025-11")
    assert (inv.base_fee, inv.vcpu_overage_usd, inv.memory_overage_usd, inv.total) == (0, 0, 0, D("0.00"))
    assert not inv.over_included


def test_free_over_included_costs_nothing_but_is_flagged():
    # 7 vCPU-h used, 5 included: 2 h over at $0 (free: no overage, must upgrade)
    inv = invoice(OrgUsage("f", "free", D("7"), D("10.5")), T["free"], "2025-11")
    assert inv.vcpu_overage_hours == D("2") and inv.memory_overage_hours == D("0.5")
    assert inv.total == D("0.00") and inv.over_included


def test_starter_overage():
    # vCPU: 30.5 - 25 = 5.5 h x $0.15 = $0.825 -> $0.83 (half up); memory: 62.25 - 50 = 12.25 x $0.05 = $0.6125
    # -> $0.61; total 10 + 0.83 + 0.61 = $11.44
    inv = invoice(OrgUsage("s", "starter", D("30.5"), D("62.25")), T["starter"], "2025-11")
    assert (inv.vcpu_overage_hours, inv.vcpu_overage_usd) == (D("5.5"), D("0.83"))
    assert (inv.memory_overage_hours, inv.memory_overage_usd) == (D("12.25"), D("0.61"))
    assert inv.base_fee == D("10.00") and inv.total == D("11.44") and inv.over_included


def test_pro_exactly_included_and_memory_over():
    # vCPU exactly 200 included: no overage; memory 750.125 - 500 = 250.125 x $0.04 = $10.005 -> $10.01
    inv = invoice(OrgUsage("p", "pro", D("200"), D("750.125")), T["pro"], "2025-11")
    assert inv.vcpu_overage_hours == 0 and inv.vcpu_overage_usd == D("0.00")
    assert inv.memory_overage_usd == D("10.01") and inv.total == D("60.01")


def test_enterprise_vcpu_over():
    # 1234.567891 - 1000 = 234.567891 h x $0.10 = $23.4567891 -> $23.46; memory 2000 = included
    inv = invoice(OrgUsage("e", "enterprise", D("1234.567891"), D("2000")), T["enterprise"], "2025-11")
    assert inv.vcpu_overage_usd == D("23.46") and inv.memory_overage_usd == D("0.00")
    assert inv.total == D("223.46")


def test_no_usage_is_the_base_fee():
    for name, fee in (("free", "0.00"), ("starter", "10.00"), ("pro", "50.00"), ("enterprise", "200.00")):
        assert invoice(OrgUsage("x", name), T[name], "2025-11").total == D(fee)


# ---------------------------------------------------------------------------------------------- cost model


def test_seed_margin_figures():
    # seed 001 section 6.4: $700 revenue, $80 + $41.80 costs -> 82.6%; 1,000 tenants: $7,000, $668 -> 90.5%;
    # appendix B: $7,000, $483 -> 93.1%
    assert gross_margin(D(700), D("121.80")) == D("82.60")
    assert gross_margin(D(7000), D(668)) == D("90.46")
    assert gross_margin(D(7000), D(483)) == D("93.10")
    assert gross_margin(D(0), D(5)) is None


def test_allocate_adds_up():
    assert allocate(D("1.00"), [D(1), D(1), D(1)]) == [D("0.34"), D("0.33"), D("0.33")]
    assert allocate(D("10"), [D(0), D(0)]) == [D("5.00"), D("5.00")]
    assert allocate(D("0.05"), [D(1), D(3)]) == [D("0.01"), D("0.04")]
    parts = allocate(D("80"), [D(i) for i in range(1, 98)])
    assert sum(parts) == D("80.00")


def test_metered_cost_of_the_seed_tenants():
    # seed 001 section 6.3 at Railway's rates ($0.000002156/vCPU-s, $0.000001078/GB-s, $0.10/GB egress):
    # PRO: 6,000 queries x 100 ms x 0.2 vCPU = 120 vCPU-s = $0.00025872 (the seed prints $0.259: its
    # arithmetic is 1,000x too high); 6,000 x 100 ms x 50 MB = 30 GB-s = $0.00003234; 600 MB egress = $0.06
    vcpu_h, mem_h = estimate(6000 * 0.1, 0.0, "pro")
    assert vcpu_h * 3600 == pytest.approx(120) and mem_h * 3600 == pytest.approx(30)
    pro = OrgUsage("p", "pro", D(120) / 3600, D(30) / 3600, 6000, 600_000_000)
    assert metered_cost(pro).quantize(D("0.00000001")) == D("0.06029106")
    # FREE: 1.5 vCPU-s = $0.000003234, 0.3 GB-s = $0.0000003234, 30 MB = $0.003
    free = OrgUsage("f", "free", D("1.5") / 3600, D("0.3") / 3600, 300, 30_000_000)
    assert metered_cost(free).quantize(D("0.0000000001")) == D("0.0030035574")


def _seed_tenants() -> list[OrgUsage]:
    # 70 FREE, 20 STARTER, 10 PRO with the seed's monthly profiles (section 6.3)
    out = [OrgUsage(f"free{i:02d}", "free", D("1.5") / 3600, D("0.3") / 3600, 300, 30_000_000) for i in range(70)]
    out += [OrgUsage(f"starter{i:02d}", "starter", D("16.875") / 3600, D("3.375") / 3600, 1500, 150_000_000)
            for i in range(20)]
    out += [OrgUsage(f"pro{i:02d}", "pro", D(120) / 3600, D(30) / 3600, 6000, 600_000_000) for i in range(10)]
    return out


def test_seed_100_tenant_scenario():
    bill = build_bill("2025-11", _seed_tenants(), T, D(80))
    # revenue: 70 x $0 + 20 x $10 + 10 x $50 = $700; everyone is within the included hours
    assert bill.revenue == D("700.00") and not any(i.over_included for i in bill.invoices)
    free, starter, pro = bill.tiers
    # metered: FREE $0.003004 (6 decimals) x 70 = $0.210280; STARTER $0.015040 x 20 = $0.300800;
    # PRO $0.060291 x 10 = $0.602910; total $1.113990
    assert (free.metered_cost, starter.metered_cost, pro.metered_cost) == (D("0.210280"), D("0.300800"),
                                                                           D("0.602910"))
    # $80 = 8,000 cents by metered cost (sum of weights 1.113960033): a FREE tenant 21.57 cents, STARTER
    # 108.01, PRO 432.98; floors 70x21 + 20x108 + 10x432 = 7,950; the 50 cents left go to the largest
    # remainders: the 10 PRO (.98), then 40 of the 70 FREE (.57) -> $15.10, $21.60, $43.30
    assert (free.infra_share, starter.infra_share, pro.infra_share) == (D("15.10"), D("21.60"), D("43.30"))
    assert [c.infra_share for c in bill.costs if c.tier == "pro"] == [D("4.33")] * 10
    # margins: STARTER (200 - 21.9008) / 200 = 89.05%; PRO (500 - 43.90291) / 500 = 91.22%; FREE none
    assert (free.margin_pct, starter.margin_pct, pro.margin_pct) == (None, D("89.05"), D("91.22"))
    assert free.profit == D("-15.310280")
    # total: cost 80 + 1.11399 = $81.11399, profit $618.88601, margin 88.41%. The seed's $41.80 of tenant
    # costs are mostly storage ($36.75), which the proxy does not meter, plus its 1,000x compute slip.
    assert bill.total.cost == D("81.113990") and bill.total.profit == D("618.886010")
    assert bill.total.margin_pct == D("88.41")
    # with the seed's whole cost as the infrastructure bill the margin is the seed's 82.6% less the metered
    # costs: (700 - 121.80 - 1.11399) / 700 = 82.44%
    assert build_bill("2025-11", _seed_tenants(), T, D("121.80")).total.margin_pct == D("82.44")


def test_no_usage_splits_evenly_and_no_infra_no_costs():
    us = [OrgUsage("a", "pro"), OrgUsage("b", "starter"), OrgUsage("c", "free")]
    bill = build_bill("2025-11", us, T, D("10"))
    assert sorted(c.infra_share for c in bill.costs) == [D("3.33"), D("3.33"), D("3.34")]
    assert [i.org for i in bill.invoices] == ["c", "b", "a"]  # by tier rank
    assert build_bill("2025-11", us, T).costs == []


def test_month_bounds():
    s, e = month_bounds("2025-12")
    assert (s.year, s.month, e.year, e.month) == (2025, 12, 2026, 1)
    for bad in ("2025-13", "2025", "25-01", "2025-1"):
        with pytest.raises(ValueError):
            month_bounds(bad)


# ---------------------------------------------------------------------------------------------- CLI


PERIOD = "2031-07"


def _insert(dsn: str, org_name: str, n: int, vcpu_h: str, mem_h: str, day: int, bytes_out: int = 0) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        oid = conn.execute("SELECT id FROM platform.organizations WHERE name = %s", (org_name,)).fetchone()[0]
        conn.execute(
            "INSERT INTO platform.usage_metrics (id, org_id, org_name, database_type, worker, period_start,"
            " period_end, query_count, error_count, vcpu_hours, memory_gb_hours, bytes_out, peak_connections)"
            " VALUES (%s, %s, %s, 'postgres', 'm0-w1', %s, %s::timestamptz + interval '10 s', %s, 1, %s, %s, %s, 3)",
            (str(uuid.uuid4()), oid, org_name, f"{PERIOD}-{day:02d}T10:00:00Z", f"{PERIOD}-{day:02d}T10:00:00Z",
             n, vcpu_h, mem_h, bytes_out))


@pytest.fixture(scope="module")
def billed(make_org, migrated, platform_dsn):
    s = make_org("bill_s", "starter")
    p = make_org("bill_p", "pro")
    # starter: 20 + 10.5 = 30.5 vCPU-h, 30 + 32.25 = 62.25 GB-h -> $11.44 (see test_starter_overage)
    _insert(platform_dsn, s.name, 100, "20", "30", 1)
    _insert(platform_dsn, s.name, 50, "10.5", "32.25", 2)
    # pro: 200 vCPU-h, 750.125 GB-h -> $60.01
    _insert(platform_dsn, p.name, 7, "200", "750.125", 3)
    # outside the period: not billed
    _insert(platform_dsn, p.name, 7, "999", "999", 1)  # moved to the month before just below
    with psycopg.connect(platform_dsn, autocommit=True) as conn:
        conn.execute("UPDATE platform.usage_metrics SET period_start = period_start - interval '31 days',"
                     " period_end = period_end - interval '31 days' WHERE vcpu_hours = 999")
    return migrated


def test_cli_bill_json(billed):
    out = json.loads(run_o7s(billed, "bill", "--period", PERIOD, "--format", "json", "--infra-cost", "100").stdout)
    inv = {i["org"]: i for i in out["invoices"]}
    assert inv["bill_s"]["total"] == "11.44" and inv["bill_s"]["vcpu_overage_usd"] == "0.83"
    assert inv["bill_s"]["queries"] == 150
    assert inv["bill_p"]["total"] == "60.01" and inv["bill_p"]["memory_overage_usd"] == "10.01"
    assert D(out["infra_cost"]) == D(100)
    assert sum(D(c["infra_share"]) for c in out["costs"]) == D("100.00")
    assert {t["tier"] for t in out["tiers"]} >= {"starter", "pro"}
    # the pro org used the most: the largest share
    shares = {c["org"]: D(c["infra_share"]) for c in out["costs"]}
    assert shares["bill_p"] == max(shares.values())


def test_cli_bill_table_csv_and_one_org(billed):
    table = run_o7s(billed, "bill", "--period", PERIOD, "--infra-cost", "100").stdout
    assert "bill_s" in table and "11.44" in table and "Gross margin per tier" in table
    rows = list(csv.DictReader(io.StringIO(run_o7s(billed, "bill", "--period", PERIOD, "--format", "csv",
                                                   "--org", "bill_p").stdout)))
    assert [r["org"] for r in rows] == ["bill_p"] and rows[0]["total"] == "60.01"


def test_cli_bill_errors(billed):
    r = run_o7s(billed, "bill", "--period", "2031-13", check=False)
    assert r.returncode == 2 and "YYYY-MM" in r.stderr
    r = run_o7s(billed, "bill", "--period", PERIOD, "--infra-cost", "lots", check=False)
    assert r.returncode == 2
    r = run_o7s(billed, "bill", "--period", PERIOD, "--org", "nosuch", check=False)
    assert r.returncode == 1 and "nosuch" in r.stderr


def test_cli_usage(billed):
    out = json.loads(run_o7s(billed, "usage", "bill_s", "--since", PERIOD, "--until", PERIOD,
                             "--format", "json").stdout)
    rows = out["rows"]
    assert [r["period"] for r in rows] == [f"{PERIOD}-01", f"{PERIOD}-02", "total"]
    assert rows[-1]["queries"] == 150 and rows[-1]["errors"] == 2 and D(rows[-1]["vcpu_hours"]) == D("30.5")
    by_month = json.loads(run_o7s(billed, "usage", "bill_p", "--since", "2031-01-01", "--until", "2031-12-31",
                                  "--by", "month", "--format", "json").stdout)["rows"]
    assert [r["period"] for r in by_month] == ["2031-05", PERIOD, "total"]  # July 1 - 31 days
    table = run_o7s(billed, "usage", "bill_s", "--since", PERIOD, "--until", PERIOD).stdout
    assert "usage of org bill_s" in table and "150" in table
    r = run_o7s(billed, "usage", "nosuch", check=False)
    assert r.returncode == 1 and "nosuch" in r.stderr
    r = run_o7s(billed, "usage", "bill_s", "--since", "yesterday-ish", check=False)
    assert r.returncode == 2
