# Library verbosity for the `ddpo` process and, through each actor's runtime env, for Ray's
# workers (which on a cluster start with the head's environment, not ours).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
