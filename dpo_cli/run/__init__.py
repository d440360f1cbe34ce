"""Running the work: the training run (setup.py builds it, loop.py steps it, callbacks.py act around its steps),
checkpoints, metrics, reference precompute, evaluation, generation, reports and trackers, interrupts, and the one
place that knows about several processes (distributed).

Owns everything a command does over time. May import: config, data, dpo, model, errors, files, output_folder.
"""
