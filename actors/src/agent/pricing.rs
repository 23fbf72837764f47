//! What a turn costs, in integer micro-USD (DESIGN §2: no floats in events).

use crate::provider::Usage;

/// Micro-USD (millionths of a dollar) per one million tokens: a price of
/// $2.50 per million input tokens is `input_micros_per_mtok: 2_500_000`.
///
/// `usage_recorded` copies both figures, so a later price change never
/// rewrites what an old turn cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Price {
    /// Price of prompt (context) tokens.
    pub input_micros_per_mtok: u64,
    /// Price of completion (reply) tokens.
    pub output_micros_per_mtok: u64,
}

impl Price {
    /// No charge (the `echo` agent, a local model nobody bills for).
    pub const FREE: Price = Price {
        input_micros_per_mtok: 0,
        output_micros_per_mtok: 0,
    };

    /// A price in micro-USD per million input and output tokens.
    pub const fn new(input_micros_per_mtok: u64, output_micros_per_mtok: u64) -> Self {
        Price {
            input_micros_per_mtok,
            output_micros_per_mtok,
        }
    }

    /// The built-in price of a widely used hosted model (list prices in USD
    /// per million tokens, standard tier, as published in 2025), matched by
    /// the longest known name the model's name starts with, so dated
    /// snapshots (`gpt-4o-2024-08-06`) take their family's price. `None` for
    /// anything else — local models cost nothing unless `[prices.<model>]`
    /// in `switchboard.toml` says otherwise, and that table wins over this one.
    ///
    /// ```
    /// use switchboard_actors::agent::Price;
    ///
    /// assert_eq!(Price::builtin("gpt-4o-mini-2024-07-18"), Some(Price::new(150_000, 600_000)));
    /// assert_eq!(Price::builtin("gpt-4o"), Some(Price::new(2_500_000, 10_000_000)));
    /// assert_eq!(Price::builtin("llama3.2"), None);
    /// ```
    pub fn builtin(model: &str) -> Option<Price> {
        BUILTIN_PRICES
            .iter()
            .filter(|(name, _)| model.starts_with(name))
            .max_by_key(|(name, _)| name.len())
            .map(|&(_, price)| price)
    }

    /// The cost of `usage` at this price, in micro-USD.
    ///
    /// Rounding rule: the exact cost is
    /// `(prompt_tokens × input + completion_tokens × output) / 1_000_000`
    /// micro-USD, computed in `u128` so no product overflows, and a fraction
    /// is **rounded up** to the next whole micro-USD. Spend is never
    /// under-counted, and a turn that used any priced token costs at least one
    /// micro-USD. The rounding is per turn, so a sum of turns can exceed the
    /// exactly-rounded total by less than one micro-USD per turn. A cost beyond
    /// `u64::MAX` micro-USD (about 18 trillion dollars) saturates.
    ///
    /// ```
    /// use switchboard_actors::agent::Price;
    /// use switchboard_actors::provider::Usage;
    ///
    /// // gpt-4o: $2.50 / $10.00 per million tokens.
    /// let price = Price::new(2_500_000, 10_000_000);
    /// let usage = Usage { prompt_tokens: 17, completion_tokens: 5 };
    /// assert_eq!(price.cost_micros(usage), 93); // 92.5 rounded up
    /// ```
    pub fn cost_micros(&self, usage: Usage) -> u64 {
        // Each product fits in u128; only their sum can overflow, far past u64.
        let input = u128::from(usage.prompt_tokens) * u128::from(self.input_micros_per_mtok);
        let output = u128::from(usage.completion_tokens) * u128::from(self.output_micros_per_mtok);
        let exact_times_million = input.saturating_add(output);
        let micros = exact_times_million.div_ceil(1_000_000);
        u64::try_from(micros).unwrap_or(u64::MAX)
    }
}

/// Built-in list prices (micro-USD per million input and output tokens); see
/// [`Price::builtin`].
const BUILTIN_PRICES: &[(&str, Price)] = &[
    ("gpt-4o", Price::new(2_500_000, 10_000_000)),
    ("gpt-4o-mini", Price::new(150_000, 600_000)),
    ("gpt-4.1", Price::new(2_000_000, 8_000_000)),
    ("gpt-4.1-mini", Price::new(400_000, 1_600_000)),
    ("gpt-4.1-nano", Price::new(100_000, 400_000)),
    ("gpt-4-turbo", Price::new(10_000_000, 30_000_000)),
    ("gpt-3.5-turbo", Price::new(500_000, 1_500_000)),
    ("o1", Price::new(15_000_000, 60_000_000)),
    ("o1-mini", Price::new(1_100_000, 4_400_000)),
    ("o3", Price::new(2_000_000, 8_000_000)),
    ("o3-mini", Price::new(1_100_000, 4_400_000)),
    ("o4-mini", Price::new(1_100_000, 4_400_000)),
    ("claude-3-5-sonnet", Price::new(3_000_000, 15_000_000)),
    ("claude-3-7-sonnet", Price::new(3_000_000, 15_000_000)),
    ("claude-sonnet-4", Price::new(3_000_000, 15_000_000)),
    ("claude-3-5-haiku", Price::new(800_000, 4_000_000)),
    ("claude-3-opus", Price::new(15_000_000, 75_000_000)),
    ("claude-opus-4", Price::new(15_000_000, 75_000_000)),
    ("gemini-1.5-pro", Price::new(1_250_000, 5_000_000)),
    ("gemini-1.5-flash", Price::new(75_000, 300_000)),
    ("gemini-2.0-flash", Price::new(100_000, 400_000)),
    ("mistral-large", Price::new(2_000_000, 6_000_000)),
    ("mistral-small", Price::new(200_000, 600_000)),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
        }
    }

    #[test]
    fn exact_costs_are_not_rounded() {
        let price = Price::new(1_000_000, 2_000_000); // $1 / $2 per Mtok
        assert_eq!(price.cost_micros(usage(10, 20)), 50);
        assert_eq!(
            price.cost_micros(usage(1_000_000, 1_000_000)),
            3_000_000,
            "a million tokens each way cost $3"
        );
    }

    #[test]
    fn fractions_round_up() {
        let price = Price::new(150_000, 600_000); // gpt-4o-mini
                                                  // 1 × 0.15 = 0.15 micro-USD → 1
        assert_eq!(price.cost_micros(usage(1, 0)), 1);
        // 7 × 0.15 + 3 × 0.6 = 2.85 → 3
        assert_eq!(price.cost_micros(usage(7, 3)), 3);
        // 20 × 0.15 + 0 = 3.0 exactly → 3
        assert_eq!(price.cost_micros(usage(20, 0)), 3);
        // 21 × 0.15 = 3.15 → 4
        assert_eq!(price.cost_micros(usage(21, 0)), 4);
    }

    #[test]
    fn zero_tokens_or_free_cost_nothing() {
        assert_eq!(Price::new(5, 7).cost_micros(usage(0, 0)), 0);
        assert_eq!(Price::FREE.cost_micros(usage(1_000_000, 1_000_000)), 0);
        assert_eq!(Price::default(), Price::FREE);
    }

    #[test]
    fn large_values_do_not_overflow() {
        // 10^12 tokens at $100 per Mtok: 10^12 × 10^8 / 10^6 = 10^14 micro-USD.
        let price = Price::new(100_000_000, 100_000_000);
        assert_eq!(
            price.cost_micros(usage(1_000_000_000_000, 0)),
            100_000_000_000_000
        );
        // The products exceed u64 but the u128 intermediate holds them.
        let big = Price::new(u64::MAX, 0);
        assert_eq!(
            big.cost_micros(usage(1_000_000, 0)),
            u64::MAX,
            "u64::MAX × 10^6 / 10^6"
        );
        assert_eq!(
            big.cost_micros(usage(1, 0)),
            u64::MAX.div_ceil(1_000_000),
            "one token at the largest price"
        );
        // Beyond u64 the cost saturates instead of wrapping.
        let max = Price::new(u64::MAX, u64::MAX);
        assert_eq!(max.cost_micros(usage(u64::MAX, u64::MAX)), u64::MAX);
    }
}
