"""Stage 2's side: the train story, flow-matching maths, global batches, LoRA, the step, checkpoints."""
