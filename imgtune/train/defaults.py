"""Training defaults the command line shows in its help; nothing here imports torch, so ``--help`` stays quick."""

#: Optimizer steps the automatic epoch counts of :meth:`Learner.fine_tune` aim for, per phase.
AUTO_STEPS = {"frozen": 60, "unfrozen": 80, "frozen_features": 600}

#: Partial fine-tuning on a CPU (``tune_stages``, see :mod:`imgtune.train.partial`): ``auto`` trains the
#: body's last stages only when the training split has at least ``min_images_per_class`` images per class,
#: picks the most stages (up to ``max_stages``) whose measured epoch time lets ``min_epochs`` epochs fit
#: ``budget_seconds``, and trains as many epochs as fit (``min_epochs`` .. ``max_epochs``). ``lr`` is the
#: trained stages' peak rate, the head's ``head_lr_mult`` times it; ``shift`` cells of random map
#: translation and ``label_smoothing`` regularise.
PARTIAL = {"budget_seconds": 70.0, "min_images_per_class": 50, "max_stages": 3, "min_epochs": 4, "max_epochs": 12,
           "lr": 5e-4, "head_lr_mult": 4.0, "shift": 1, "label_smoothing": 0.1}
