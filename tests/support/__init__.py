"""Host tools for the tests, the benchmarks and the demo, kept out of the installed ``kata`` package:
busybox bundles and images made without a registry, containerd and dockerd started privately (with a small
CRI client and the CRI plugin's config), named network namespaces. Imported as ``tests.support`` from the
repository root."""
