"""Where the processes run: the launch plan for one GPU, torchrun on many nodes and SLURM.

Owns the machine facts the launcher reads and the decisions that follow from them (facts), torchrun's
rendezvous and the loopback environment of a launcher-less run (rendezvous), SLURM (slurm) and the
pure plan from flags + environment + facts to the command to exec (plan). May import qlaunch.config only.
"""
