"""The answers of `steerlm evaluate` and their measurements: generate what the cache lacks, model by model, and
measure each steered answer's level of the steered attribute (a computed attribute by the model's own measure, the
rest by the measuring APM, which must not be the one that labelled the model's training data).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from steerlm.attributes import AttributeSchema
from steerlm.errors import UserError
from steerlm.evaluation.cache import Cache, fill, free_memory, fresh, missing_error, path_fingerprint
from steerlm.evaluation.planning import Job, model_sampling, schema_of, score_key, scored_record

if TYPE_CHECKING:  # the settings live in the stage module, which imports this one
    from steerlm.evaluate import Config, ModelSpec


def generate_missing(cfg: Config, specs: dict[str, ModelSpec], infos: dict[str, dict], jobs: list[Job],
                     cache: Cache, loader: Callable) -> int:  # fmt: skip
    """Generate the answers the cache lacks, model by model, appending each chunk to the cache; fill `job.answer`."""
    todo: dict[str, dict[str, Job]] = defaultdict(dict)
    for j in jobs:
        if not fresh(cache.get(j.key), infos[j.model]["fingerprint"], cfg.from_cache):
            todo[j.model].setdefault(j.key, j)  # identical requests are generated once
    if todo and cfg.from_cache:
        raise missing_error("answers", {m: len(v) for m, v in todo.items()})
    made = 0
    for name, pending in todo.items():
        spec, items = specs[name], list(pending.values())
        print(f"[generate] {name}: {len(items)} answers from {spec.path}", flush=True)
        gen, sampling = loader(spec, cfg), model_sampling(cfg, name, infos[name])
        step = cfg.batch_size * 4
        with tqdm(total=len(items), desc=name, unit="answer", leave=False) as bar:
            for start in range(0, len(items), step):
                part = items[start : start + step]
                asked = [j.attributes if j.named is None or j.attributes is None else j.named for j in part]
                answers = gen.generate([j.prompt.conversation for j in part], asked,
                                       sampling, batch_size=cfg.batch_size)  # fmt: skip
                cache.add([{"key": j.key, "model": name, "path": spec.path, "fp": infos[name]["fingerprint"],
                            "prompt_id": j.prompt.pid, "attributes": j.attributes, "answer": a}
                           for j, a in zip(part, answers, strict=True)])  # fmt: skip
                bar.update(len(part))
                made += len(part)
        del gen
        free_memory()
    for j in jobs:
        j.answer = cache.get(j.key)["answer"]
    return made


def computed_scorer(info: dict, attribute: str):
    """The model's own measure of an attribute computed from the answer's text (`verbosity`, by the length
    buckets in its steerlm_model.json), or None. Such an attribute is measured exactly, not by the APM."""
    computed = (info.get("meta") or {}).get("computed") or {}
    if attribute not in computed:
        return None
    from steerlm.attributes import computed_from_dict
    from steerlm.steerability import scorer_for

    return scorer_for(attribute, None, computed_from_dict({attribute: computed[attribute]}))


def measure(cfg: Config, jobs: list[Job], infos: dict[str, dict], cache: Cache, loader: Callable,
            notes: list[str]) -> dict[tuple[str, str], tuple[float, int] | None]:  # fmt: skip
    """(generation key, attribute) -> (measured level, levels of its scale), or None when the APM gave none. Computed
    attributes are measured by the model's own measure, the rest by the APM (`measure_missing`)."""
    out: dict[tuple[str, str], tuple[float, int] | None] = {}
    by_apm = []
    for j in jobs:
        scorer = computed_scorer(infos[j.model], j.attribute)
        if scorer is None:
            by_apm.append(j)
            continue
        levels = (schema_of(infos[j.model]) or AttributeSchema(levels=10)).levels
        notes.append(f"Steerability: `{j.attribute}` of `{j.model}` is computed from the answer's text, so it is "
                     "measured by the model's own measure (its length buckets), not by the APM.")  # fmt: skip
        out[(j.key, j.attribute)] = (scorer.predict([scored_record(j.prompt, j.answer)])[0][j.attribute], levels)
    rows = measure_missing(cfg, by_apm, cache, loader)
    for j in by_apm:
        row = rows[j.key]
        value = row["value"].get(j.attribute)
        out[(j.key, j.attribute)] = None if value is None else (value, row["levels"])
    return out


def measure_missing(cfg: Config, jobs: list[Job], cache: Cache, loader: Callable) -> dict[str, dict]:
    """APM levels of every steered answer (job key -> {"value": {attribute: level}, "levels": L of the APM})."""
    if not jobs:
        return {}
    if not cfg.steerability.apm:
        raise UserError("steerability needs an APM to measure the answers", field="steerability.apm")
    from steerlm.apm_model import apm_folder

    path = cfg.steerability.apm
    scorer = f"apm:{path}"
    fp = "" if cfg.from_cache else path_fingerprint(apm_folder(path))
    keys = {j.key: score_key(scorer, j.prompt, j.answer) for j in jobs}
    missing: dict[str, Job] = {}
    for j in jobs:
        if not fresh(cache.get(keys[j.key]), fp, cfg.from_cache):
            missing.setdefault(keys[j.key], j)

    def rows(apm, part: list[str]) -> list[dict]:
        preds = apm.predict([scored_record(missing[k].prompt, missing[k].answer) for k in part],
                            batch_size=cfg.steerability.batch_size)  # fmt: skip
        return [{"key": k, "scorer": scorer, "fp": fp, "value": {a: float(v) for a, v in p.items()},
                 "levels": apm.schema.levels} for k, p in zip(part, preds, strict=True)]  # fmt: skip

    fill(cache, list(missing), from_cache=cfg.from_cache, what="APM measurements", source=scorer,
         announce=f"[measure] {len(missing)} answers with the APM {path}", load=lambda: loader(path), rows=rows,
         step=256, desc="measure")  # fmt: skip
    return {j.key: cache.get(keys[j.key]) for j in jobs}
