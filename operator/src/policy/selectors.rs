//! Whether two label selectors can select one pod together, now or when it is created later:
//! the never-widen checks compare selectors, not only the pods that exist at the time.
//!
//! Exact for Kubernetes' selector language (`matchLabels`, `In`, `NotIn`, `Exists`,
//! `DoesNotExist`); a selector it cannot read is taken to overlap everything.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// What the selectors together ask of one label key.
#[derive(Debug, Default)]
struct KeyRule {
    /// Values the key may take (`None`: any); set by `In` and `matchLabels`.
    allowed: Option<BTreeSet<String>>,
    /// Values the key may not take (`NotIn`).
    excluded: BTreeSet<String>,
    /// `In`, `Exists` or `matchLabels` ask for the key.
    present: bool,
    /// `DoesNotExist` forbids the key.
    absent: bool,
}

impl KeyRule {
    fn allow(&mut self, values: BTreeSet<String>) {
        self.present = true;
        self.allowed = Some(match self.allowed.take() {
            Some(before) => before.intersection(&values).cloned().collect(),
            None => values,
        });
    }

    fn satisfiable(&self) -> bool {
        if self.present && self.absent {
            return false;
        }
        self.allowed
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|v| !self.excluded.contains(v)))
    }
}

/// Adds `selector`'s requirements to `rules`; false when it cannot be read (unknown operator,
/// `In`/`NotIn` without values), as the API server would refuse it.
fn add(rules: &mut BTreeMap<String, KeyRule>, selector: &LabelSelector) -> bool {
    for (key, value) in selector.match_labels.iter().flatten() {
        rules
            .entry(key.clone())
            .or_default()
            .allow(BTreeSet::from([value.clone()]));
    }
    for expression in selector.match_expressions.iter().flatten() {
        let rule = rules.entry(expression.key.clone()).or_default();
        let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
        match expression.operator.as_str() {
            "In" if !values.is_empty() => rule.allow(values),
            "NotIn" if !values.is_empty() => rule.excluded.extend(values),
            "Exists" => rule.present = true,
            "DoesNotExist" => rule.absent = true,
            _ => return false,
        }
    }
    true
}

/// True when some set of labels satisfies every one of `selectors` (an empty selector, or
/// none at all, selects every pod). A selector that cannot be read counts as satisfiable:
/// doubt must never lead to widening.
pub fn can_select_together(selectors: &[&LabelSelector]) -> bool {
    let mut rules = BTreeMap::new();
    for selector in selectors {
        if !add(&mut rules, selector) {
            return true;
        }
    }
    rules.values().all(KeyRule::satisfiable)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use kube::core::{Selector, SelectorExt};
    use proptest::prelude::*;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            match_expressions: None,
        }
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: operator.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| (*v).to_owned()).collect()),
            }]),
        }
    }

    #[test]
    fn different_values_of_one_key_never_select_one_pod() {
        assert!(!can_select_together(&[
            &labels(&[("app", "web")]),
            &labels(&[("app", "db")])
        ]));
    }

    #[test]
    fn different_keys_can_select_a_pod_created_with_both() {
        assert!(can_select_together(&[
            &labels(&[("app", "web")]),
            &labels(&[("tier", "front")])
        ]));
    }

    #[test]
    fn an_empty_selector_selects_together_with_any() {
        assert!(can_select_together(&[
            &LabelSelector::default(),
            &labels(&[("app", "web")])
        ]));
    }

    #[test]
    fn expressions_are_honoured() {
        let web = labels(&[("app", "web")]);
        assert!(!can_select_together(&[
            &web,
            &expression("app", "NotIn", &["web"])
        ]));
        assert!(can_select_together(&[
            &web,
            &expression("app", "NotIn", &["db"])
        ]));
        assert!(!can_select_together(&[
            &web,
            &expression("app", "DoesNotExist", &[])
        ]));
        assert!(can_select_together(&[
            &web,
            &expression("tier", "DoesNotExist", &[])
        ]));
        assert!(!can_select_together(&[
            &expression("app", "In", &["a", "b"]),
            &expression("app", "In", &["c"])
        ]));
        assert!(can_select_together(&[
            &expression("app", "In", &["a", "b"]),
            &expression("app", "Exists", &[])
        ]));
    }

    #[test]
    fn an_unreadable_selector_selects_together_with_any() {
        assert!(can_select_together(&[
            &labels(&[("app", "web")]),
            &expression("app", "Sometimes", &[])
        ]));
        assert!(can_select_together(&[
            &labels(&[("app", "web")]),
            &expression("app", "In", &[])
        ]));
    }

    fn arb_selector() -> impl Strategy<Value = LabelSelector> {
        let key = prop::sample::select(vec!["app", "tier"]);
        let value = prop::sample::select(vec!["a", "b", "c"]);
        let operator = prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]);
        let requirement = (key, operator, prop::collection::vec(value, 1..3)).prop_map(
            |(key, operator, values)| LabelSelectorRequirement {
                key: key.into(),
                operator: operator.into(),
                values: matches!(operator, "In" | "NotIn")
                    .then(|| values.iter().map(|v| (*v).to_owned()).collect()),
            },
        );
        let matched = prop::collection::btree_map(
            prop::sample::select(vec!["app", "tier"]).prop_map(String::from),
            prop::sample::select(vec!["a", "b"]).prop_map(String::from),
            0..2,
        );
        (matched, prop::collection::vec(requirement, 0..3)).prop_map(|(matched, expressions)| {
            LabelSelector {
                match_labels: (!matched.is_empty()).then_some(matched),
                match_expressions: (!expressions.is_empty()).then_some(expressions),
            }
        })
    }

    /// Every label set over the keys and values the generator uses, plus an unused value.
    fn every_label_set() -> Vec<BTreeMap<String, String>> {
        let values = [None, Some("a"), Some("b"), Some("c"), Some("z")];
        let mut sets = Vec::new();
        for app in values {
            for tier in values {
                let mut set = BTreeMap::new();
                if let Some(app) = app {
                    set.insert("app".to_owned(), app.to_owned());
                }
                if let Some(tier) = tier {
                    set.insert("tier".to_owned(), tier.to_owned());
                }
                sets.push(set);
            }
        }
        sets
    }

    proptest! {
        /// The verdict agrees with trying every pod one could create: some label set is
        /// selected by both exactly when the selectors can select together.
        #[test]
        fn agrees_with_every_pod_one_could_create(a in arb_selector(), b in arb_selector()) {
            let (sa, sb) = (
                Selector::try_from(a.clone()).unwrap(),
                Selector::try_from(b.clone()).unwrap(),
            );
            let some_pod = every_label_set()
                .iter()
                .any(|labels| sa.matches(labels) && sb.matches(labels));
            prop_assert_eq!(can_select_together(&[&a, &b]), some_pod);
        }
    }
}
