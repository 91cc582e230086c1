-- Per-language statistics of the filtered corpus, by the language ID label (not the declared language).
-- Inputs (views registered by mmbert_dagster.mixtures): documents(doc_id, text), language_id(doc_id, lang, passed),
--   fertility(lang, tokens_per_byte) measured with the trained tokenizer on a sample of each language
-- Parameters: $tier_high, $tier_mid
WITH confident_documents AS (  -- documents whose language ID score passed their language's threshold
    SELECT language_id.lang, strlen(documents.text) AS bytes  -- strlen = UTF-8 bytes
    FROM documents
    JOIN language_id USING (doc_id)
    WHERE language_id.passed
),
per_language AS (
    SELECT lang, count(*) AS docs, sum(bytes)::BIGINT AS bytes
    FROM confident_documents
    GROUP BY lang
),
ranked AS (
    SELECT
        lang,
        docs,
        round(bytes * fertility.tokens_per_byte)::BIGINT AS tokens_est,
        bytes,
        row_number() OVER (ORDER BY bytes * fertility.tokens_per_byte DESC, lang) AS rank
    FROM per_language
    JOIN fertility USING (lang)
)
SELECT
    lang,
    docs,
    tokens_est,
    bytes,
    CASE WHEN rank <= $tier_high THEN 'high' WHEN rank <= $tier_mid THEN 'mid' ELSE 'low' END AS tier,
    rank
FROM ranked
ORDER BY rank
