"""What the training stages share above the library: midtraining/SFT set-up (finetune) and RL rollouts."""
