"""The benchmark suites by name. Each module has FULL and QUICK configs, ERROR_RULE, run(config, device),
and for the report COLUMNS, SEQ_KEY, SPEEDUP and family(row)."""

from __future__ import annotations

from . import decode, engine, hisa, moba, moba_decode, moba_varlen, proxyattn, s2o, xattention

SUITES = {
    "engine": engine,
    "decode": decode,
    "moba": moba,
    "moba_varlen": moba_varlen,
    "moba_decode": moba_decode,
    "xattention": xattention,
    "proxyattn": proxyattn,
    "s2o": s2o,
    "hisa": hisa,
}
