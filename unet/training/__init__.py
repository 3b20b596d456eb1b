"""Training: the run's configuration, the trainer's loop, checkpoint/resume, narration, learning-rate
schedules and the training benchmark."""
