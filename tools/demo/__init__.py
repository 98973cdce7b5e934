"""`gputrace demo`: simulated partner systems publish the programme against a running gputrace.

The programme announced on 2025-10-31: about 260,000 NVIDIA Blackwell GPUs for Korea, at `--scale`
of its real quantities (tools/demo/programme.py):

- the government's 50,000 (National AI Computing Center and sovereign AI clouds), 50,000 each for
  Samsung Electronics, SK Group and Hyundai Motor Group, 60,000 for NAVER Cloud; each share in
  tranches of at most 10,000 GPUs, one batch each (26 batches at full scale);
- every tranche pledged in kind (towards the 260,000 target) with its capital earmarked in KRW
  (SK raises one pledge, the government disburses a third of another), three vendor quotes per
  batch with the cheapest winning; one tranche ships from Taiwan via Hong Kong, so it needs an
  export licence, which the licensing liaison then grants;
- with `--serials` (the default) every serial dispatched in shipments of at most 1,000, cleared
  by customs, received (one shipment with damaged units, never installed), installed and accepted
  (one unit fails);
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
