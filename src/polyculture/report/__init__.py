"""report: the diversity report of a build and the dataset card's text.

write.write_report computes the figures per concern (diversity, attributes, monoculture, rejects, embedding_map; drawn
by plots) into the typed model (model, on values), writes report.json from it, and renders it through one Jinja
engine (jinja, with the number filters of format): markdown (report.md), html (report.html); card renders the dataset
card's body from the same model.
"""
