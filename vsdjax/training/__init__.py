"""Training: building a run from its config (models.py), the train state and the
jitted step (train_step.py), and the work directory (workdir.py). The loop
itself is vsdjax/train.py."""
