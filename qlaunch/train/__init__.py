"""Training: the Trainer and what qlaunch adds to it.

Owns the Trainer subclass, resume and requeue (trainer), the loss on labelled positions (loss),
callbacks (preemption, non-finite loss), atomic checkpoints and staged outputs (checkpoints), the
read-back of the saved adapter (verify), metrics and the report. May import every other internal
package (config, data, cluster, model, memory).
"""
