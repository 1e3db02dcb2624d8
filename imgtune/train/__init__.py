"""Training: the Learner and its loop, lr finder, schedule, callbacks, the head on cached features, distributed, one run."""
