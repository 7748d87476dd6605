"""The trainer's parts: DeepSpeed engine set-up, optimizers (incl. LARS), schedules,
checkpointing and metric logging. `sasi_online.train` wires them together."""
