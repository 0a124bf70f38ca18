"""The memory plan: how many bytes a run needs per device, and whether and how it fits.

Owns the model's shape from config.json (shape), the byte model per component and phase (estimate),
the plan of a run from its flags and settings (planner), the GPU table (gpus) and the fit verdict,
the options that fit and the out-of-memory message (fit). May import qlaunch.config, qlaunch.data
and qlaunch.model.
"""
