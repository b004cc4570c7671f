"""Pipeline stages: plain typed functions over polars frames, testable without Prefect.

Frames passed between stages (column: dtype):

cells (plan)         cell_id: i64, cell_key: str ("occupation=doctor|continent=Asia"), one str column per prompt
                     attribute, quota: i64 (records wanted), n_prompts: i64 (prompts to send)
completions (generate) call_id: str, cell_id: i64, cell_key: str, prompt attribute columns, prompt_index: i64,
                     sample_index: i64, system: str|null, user: str, completion: str, prompt_tokens: i64,
                     completion_tokens: i64, finish_reason: str, method: str, model: str, engine: str
records (validate)   record_id: str (call_id + "-" + item_index), call_id: str, cell_id: i64, cell_key: str,
                     item_index: i64, method: str, model: str, verbalized_probability: f64|null,
                     record_json: str (canonical JSON of the validated record), text: str (what is embedded),
                     one str column per attribute (prompt attributes: set by the pipeline; field attributes: read
                     from the record, null when absent)
rejects (any stage)  record_id: str|null, call_id: str, stage: str, reason: str, detail: str
embeddings           np.ndarray float32 (rows aligned with the records frame, L2-normalised)
"""
