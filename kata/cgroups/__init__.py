"""The host's cgroups: where a pod's host processes live and what they are held to (a driver, as the
hypervisor is). ``path`` reads a spec's cgroupsPath; ``host`` makes, joins, limits and removes cgroups
on cgroup v1 and v2 hosts."""
