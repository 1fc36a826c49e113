"""Host tools for the tests and benchmarks (real daemons to drive kata-runtime with); not used at run time."""
