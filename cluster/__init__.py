# Library verbosity for the `ddpo` process and, through each actor's runtime env, for Ray's
# workers (which on a cluster start with the head's environment, not ours).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
# Ray's workers also leave out the model-loading progress bars (transformers', diffusers' and
# the hub's: `ddpo.pipeline.load_pipeline`), which the driver would print once per actor; their
# logs (the dashboard, the session's log files) keep everything else
ACTOR_ENV = {**QUIET_ENV, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
