"""What a run asks for and what it runs on, decided before anything heavy loads.

Owns the flag dataclasses and YAML recipes (arguments), the fixed value sets of string flags
(choices), the domain of every numeric flag (domains), what reaches the console (console), the
usage error, file and directory checks (files), the machine facts (machine), what a checkpoint
declares in its config.json (checkpoint), the precision rules (precision), the pure checks that
collect every problem (validate) and the settings derived once from flags, checkpoint and machine
(resolve). Imports nothing else of qlaunch: every other package may import it.
"""
