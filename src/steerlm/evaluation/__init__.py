"""The pieces of `steerlm evaluate`, one module per concern; the stage itself (settings and `main`) is
`steerlm/evaluate.py`. In the order a run uses them:

    planning    prompts, what each model folder says, the answers needed (jobs) and their cache keys
    cache       the append-only JSONL cache under out/cache: keys, fingerprints, filling only what is missing
    answers     generating the answers, and measuring the steered ones (the model's own measure or the APM)
    judging     the judges (reward model, APM, OpenAI-compatible endpoint) and their cached verdicts
    statistics  steerability curves, win rates, Bradley-Terry Elo, relative scores, bootstrap intervals
    report      report.md / report.html, the plots, and the summary printed at the end
"""
