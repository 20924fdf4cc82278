"""The config's checks of the window a run trains on: ESR's K (fixed, progressive, auto, adaptive), the token
selection rule and the soft token weights. Called by config.validate with its `need`."""

from __future__ import annotations

SELECT_RULES = ("prefix", "prefix_mask", "random", "middle", "last", "top_reverse_kl", "top_forward_kl", "top_teacher_entropy",
                "top_student_entropy", "kl_x_student_entropy", "teacher_x_student_entropy", "kl_x_teacher_x_student_entropy")
WEIGHT_RULES = ("none", "decay", "iw_opd", "iw_opd_kl")  # weighting.RULES


def check_window(cfg, need) -> None:
    """need(ok, message) for every rule on rollout_tokens, its schedules, token_select and token_weight."""
    need(cfg.rollout_tokens is None or cfg.rollout_tokens in ("auto", "adaptive") or cfg.rollout_tokens > 0,
         f"rollout_tokens must be > 0, null (full rollout), auto or adaptive, got {cfg.rollout_tokens}")
    if cfg.rollout_tokens == "adaptive":
        need(cfg.rollout_tokens_schedule == "fixed", "rollout_tokens=adaptive chooses K itself: leave "
                                                     "rollout_tokens_schedule=fixed")
        need(1 <= cfg.rollout_tokens_min <= cfg.max_new_tokens,
             f"rollout_tokens_min must be between 1 and max_new_tokens={cfg.max_new_tokens}, got {cfg.rollout_tokens_min}")
        need(0 < cfg.adaptive_kl_drop < 1, f"adaptive_kl_drop must be strictly between 0 and 1, got {cfg.adaptive_kl_drop}")
        need(cfg.adaptive_patience >= 1, f"adaptive_patience must be >= 1, got {cfg.adaptive_patience}")
        need(cfg.adaptive_growth > 1, f"adaptive_growth must be > 1, got {cfg.adaptive_growth}")
        need(cfg.adaptive_reference in ("first", "peak"),
             f"adaptive_reference must be first or peak, got {cfg.adaptive_reference}")
    need(cfg.rollout_tokens_schedule in ("fixed", "progressive"),
         f"rollout_tokens_schedule must be fixed or progressive, got '{cfg.rollout_tokens_schedule}'")
    need(cfg.rollout_tokens_start >= 1, f"rollout_tokens_start must be >= 1, got {cfg.rollout_tokens_start}")
    need(cfg.schedule_steps is None or cfg.schedule_steps >= 1, f"schedule_steps must be >= 1 or null, got {cfg.schedule_steps}")
    need(cfg.rollout_tokens_schedule == "fixed" or cfg.rollout_tokens is not None,
         "rollout_tokens_schedule=progressive needs rollout_tokens (the final K), not a full rollout")
    need(cfg.rollout_tokens_schedule == "fixed" or cfg.rollout_tokens == "auto" or cfg.rollout_tokens_start <= cfg.rollout_tokens,
         f"rollout_tokens_start={cfg.rollout_tokens_start} is larger than rollout_tokens={cfg.rollout_tokens}")
    need(cfg.auto_k_problems >= 1, f"auto_k_problems must be >= 1, got {cfg.auto_k_problems}")
    need(cfg.token_select in SELECT_RULES, f"token_select must be one of {', '.join(SELECT_RULES)}, got '{cfg.token_select}'")
    need(cfg.token_select == "prefix" or cfg.rollout_tokens is None,
         f"token_select={cfg.token_select} picks tokens of full rollouts: set rollout_tokens=null (and the budget with "
         "select_tokens); token_select=prefix is ESR itself, where generation stops at K")
    need(cfg.select_tokens >= 1, f"select_tokens must be >= 1, got {cfg.select_tokens}")
    need(cfg.token_weight in WEIGHT_RULES, f"token_weight must be one of {', '.join(WEIGHT_RULES)}, got '{cfg.token_weight}'")
    need(cfg.token_weight_gamma >= 0, f"token_weight_gamma must be >= 0, got {cfg.token_weight_gamma}")
    need(0 < cfg.token_weight_decay <= 1, f"token_weight_decay must be in (0, 1], got {cfg.token_weight_decay}")
