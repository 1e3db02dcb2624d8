"""Training defaults the command line shows in its help; nothing here imports torch, so ``--help`` stays quick."""

#: Optimizer steps the automatic epoch counts of :meth:`Learner.fine_tune` aim for, per phase.
AUTO_STEPS = {"frozen": 60, "unfrozen": 80, "frozen_features": 600}
