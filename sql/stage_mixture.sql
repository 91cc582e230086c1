-- One stage's token mixture: temperature sampling p_lang ∝ tokens_lang ^ τ over the stage's languages, token
-- targets from the stage budget, and upsampling by repetition capped at $max_repeat epochs per language.
--
-- A language's target is min(λ · weight, max_repeat · tokens_available) with λ chosen so that the targets sum to
-- the budget: languages that would exceed their cap are held at it and their excess goes to the others in
-- proportion to their weights ("water-filling"). With languages ordered by the λ at which they saturate, the
-- solution is the first candidate λ that does not saturate its own language (each candidate assumes the
-- languages before it are capped). If none exists, the budget cannot be met and λ is NULL.
--
-- Replay (a late decay that adds languages to a trained model): with $replay_share > 0 the stage's languages
-- form two groups, "replay" (the languages the model already knows: $replay_languages, or the top
-- $replay_top_n by tokens) with $replay_share of the budget and "new" (the rest) with the remainder; each group
-- is water-filled on its own, with one λ per group. With $replay_share = 0 there is one group, "all".
--
-- Inputs: language_stats(lang, tokens_est, rank, tier)
-- Parameters: $stage, $tau, $budget, $max_repeat, $english, $english_boost,
--             $top_n (NULL = no top-N rule), $languages (NULL = no explicit list); both NULL = every language;
--             $replay_share, $replay_top_n (NULL = no top-N rule), $replay_languages (NULL = no explicit list)
WITH stage_languages AS (
    SELECT
        lang, tier, tokens_est::DOUBLE AS tokens_available,
        CASE
            WHEN $replay_share = 0 THEN 'all'
            WHEN rank <= $replay_top_n OR list_contains($replay_languages, lang) THEN 'replay'
            ELSE 'new'
        END AS replay_group
    FROM language_stats
    WHERE tokens_est > 0
      AND (
          ($top_n IS NULL AND $languages IS NULL)
          OR rank <= $top_n
          OR list_contains($languages, lang)
      )
),
weights AS (  -- temperature-sampling weight; English boosted in the English-heavy decay
    SELECT
        *,
        power(tokens_available, $tau) * CASE WHEN lang = $english THEN $english_boost ELSE 1.0 END AS weight,
        $max_repeat * tokens_available AS tokens_cap,
        $budget * CASE replay_group WHEN 'all' THEN 1.0 WHEN 'replay' THEN $replay_share ELSE 1.0 - $replay_share END
            AS group_budget
    FROM stage_languages
),
saturation_order AS (  -- the λ at which each language reaches its repetition cap
    SELECT *, tokens_cap / weight AS lambda_saturated FROM weights
),
candidates AS (  -- λ if every language of its group earlier in saturation order is capped and the rest are not
    SELECT
        *,
        (group_budget - coalesce(sum(tokens_cap) OVER (PARTITION BY replay_group
            ORDER BY lambda_saturated, lang ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0))
        / sum(weight) OVER (PARTITION BY replay_group
            ORDER BY lambda_saturated, lang ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING)
            AS lambda_candidate
    FROM saturation_order
),
solution AS (  -- one λ per group (a group without a solution has no row: its λ is NULL below)
    SELECT replay_group, arg_min(lambda_candidate, lambda_saturated) AS lambda
    FROM candidates
    WHERE lambda_candidate <= lambda_saturated
    GROUP BY replay_group
),
targets AS (
    SELECT
        weights.*,
        -- least() skips NULLs, so an infeasible budget (λ NULL) must stay NULL explicitly
        CASE WHEN solution.lambda IS NULL THEN NULL ELSE least(solution.lambda * weight, tokens_cap) END
            AS tokens_target_exact,
        solution.lambda * weight >= tokens_cap AS capped
    FROM weights LEFT JOIN solution USING (replay_group)
)
SELECT
    $stage AS stage,
    lang,
    tier,
    tokens_available::BIGINT AS tokens_available,
    tokens_target_exact / $budget AS share,
    round(tokens_target_exact)::BIGINT AS tokens_target,
    tokens_target_exact / tokens_available AS repeat_factor,
    weight / sum(weight) OVER () AS temperature_share,
    capped,
    replay_group
FROM targets
ORDER BY share DESC, lang
