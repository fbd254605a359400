"""The one error type of `repae evaluate` (kept in a module without heavy imports, so the command
line parser loads fast)."""


class EvaluationError(ValueError):
    """Something the evaluation cannot use (a path, a file's content, a setting), said plainly."""


# the data gave nothing to measure: every image unreadable (the record's skipped count says how many), or none
NO_IMAGES = "no readable images in the data"
