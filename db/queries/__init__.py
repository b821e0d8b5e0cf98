"""The one query layer: a module per page (or resource), each with the response models it
returns beside its queries, so every page and its JSON twin are served from the same functions;
`lookups`, `paging` and `examples` are what they share."""
