"""Running the work: the training run (setup.py builds it, loop.py steps it, callbacks.py act around its steps),
checkpoints, metrics, reference precompute, evaluation, generation, reports and trackers, interrupts, and the two
places that know about several processes: distributed (ranks, collectives, DDP) and sharding (FSDP2).

Owns everything a command does over time. May import: config, data, dpo, model, errors, files, output_folder.
"""
