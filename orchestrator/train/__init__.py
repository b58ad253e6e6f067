"""Training: the job spec turned into a Ray Train TorchTrainer whose workers are DeepSpeed engines."""
