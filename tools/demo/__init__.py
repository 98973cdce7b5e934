"""`gputrace demo`: simulated partner systems publish the 2025 programme against a running gputrace.

The programme (docs/architecture.md §1), at `--scale` of its real quantities:

- the 2025 GPU project allocations, each pledged in kind and bought as one batch: NHN Cloud
  7,656 B200, Kakao 2,424 B200, Naver Cloud 3,056 H200-SXM;
- two government-use batches for public research, funded by KDB and IBK (about 60 bn KRW each,
  their 15 % share of the SPC's 400 bn KRW equity); the IBK batch ships from Taiwan via Hong
  Kong, so it needs an export licence, which the licensing liaison then grants;
- capital pledges in KRW earmarked for every batch (Kakao raises its pledge, KDB disburses a
  third of its own), three vendor quotes per batch with the cheapest winning, awards after the
  2025-05-13 rescission, shipments of at most 1,000 serials, customs, receipt (one shipment
  arrives with damaged units, never installed), installation and acceptance (one unit fails);
- a forged award (claiming the programme office, signed with a vendor's key), which must come
  back rejected.

Every event is signed with the registered party keys (`--keys`) and published with aiokafka; the
demo reads each event's decision from `gputrace.outcomes.v1` and exits non-zero if an event it
expected to be accepted was not, so it doubles as a smoke test of a running system.
"""

from tools.demo.programme import DAMAGED_UNITS, FAILED, FORGED, LICENSED, Programme, plan
from tools.demo.publish import DemoConfig, DemoFailure, DemoReport, run_demo
from tools.demo.report import demo

__all__ = [
    "DAMAGED_UNITS",
    "FAILED",
    "FORGED",
    "LICENSED",
    "DemoConfig",
    "DemoFailure",
    "DemoReport",
    "Programme",
    "demo",
    "plan",
    "run_demo",
]
