"""distcomp: run huge bags of independent jobs on a cluster, with Redis as the coordinator."""

__version__ = "0.1.0"
