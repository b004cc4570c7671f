"""Build steps: plain typed functions over polars frames, testable without Prefect.

The contract: a stage takes the frames it works on first (completions, records, embeddings), then its configuration
(its own spec section where one section configures it, e.g. `dedup(records, embeddings, spec.dedup, references)`,
`rebalance(records, embeddings, spec.rebalance, spec.attributes, spec.target_size)`; the BuildSpec where it reads
several sections: plan, validate, extract, generate, publish), then its collaborators (engine, method), and returns
a frozen result dataclass (ValidationResult, DedupResult, QualityResult, ExtractResult, RebalanceResult,
GeneratedRound). Sections arrive validated: stages check the data they are given, never the settings again.
`summary` holds the build's bookkeeping over those results (counts, usage, stop reason). Stages never import Prefect,
flows or the report.

Frames passed between stages (column: dtype):

cells (plan)         cell_id: i64, cell_key: str ("occupation=doctor|continent=Asia"), one str column per prompt
                     attribute, quota: i64 (records wanted), n_prompts: i64 (prompts to send)
completions (generate) call_id: str ("c{cell}-p{prompt}-s{sample}", plus "-t{turn}" for multi-turn methods:
                     unique per completion), cell_id: i64, cell_key: str, prompt attribute columns, prompt_index: i64,
                     sample_index: i64, turn: i64 (0 for single-turn methods), system: str|null, user: str (the
                     rendered request; the same on every turn of a thread), messages: str (JSON list of the chat
                     messages sent for this completion: for turn t > 0 the earlier turns, each previous answer as an
                     assistant message, and the method's follow-up), completion: str, prompt_tokens: i64,
                     completion_tokens: i64, finish_reason: str, method: str, model: str, engine: str, shard: i64,
                     batch_seconds: f64 (the shard's part of its engine call's time, all turns: the time since
                     the call's previous shard came back; sum it once per shard).
                     One row per completion; a multi-turn thread is the rows sharing cell_id, prompt_index and
                     sample_index, ordered by turn.
records (validate)   record_id: str (call_id + "-" + item_index), call_id: str, cell_id: i64, cell_key: str,
                     item_index: i64, turn: i64, method: str, model: str, verbalized_probability: f64|null (in
                     [0, 1]; a percentage answer is divided by 100; null for methods without probabilities),
                     record_json: str (canonical JSON of the validated record), text: str (what is embedded),
                     one str column per attribute (prompt attributes: set by the pipeline; field attributes: read
                     from the record, null when absent). Each completion (each turn) is its own answer; the
                     method's selection (all | sample | threshold) runs per answer over its schema-valid records.
quality columns      after the quality stage (only when spec.quality has checks): `_quality_<name>`: f64|null per
                     check (its score; null where the record could not be scored; a math_answer check's is its
                     agreement), a check's extra columns (`check.extra_columns`; math_answer: `_solve_rate`: f64|null,
                     the share of its solutions equal to the author's answer) and `_quality`: bool (passed every
                     check, gated or not); rebalance reads the scores and `_quality`, publish writes the score and
                     extra columns (`check.columns`)
rejects (any stage)  record_id: str|null, call_id: str, stage: str, reason: str, detail: str
                     (validate writes stage "parse" (unparseable, truncated, malformed_item), "schema"
                     (schema_violation) and "select" (not_sampled, below_threshold); decontaminate writes stage
                     "decontaminate" (ngram_overlap, embedding_neighbour; the detail names benchmark, item and
                     score); quality writes "quality" (failed_check, the failing checks with their scores in the
                     detail)). A list answer cut short
                     keeps the responses completed before the cut as records and still has its answer-level
                     "parse" row (record_id null) for the lost remainder; its detail says how many were salvaged
embeddings           np.ndarray float32 (rows aligned with the records frame, L2-normalised)
"""
