//! The AI support-image policy: which instances are AI "support images" (CAD overlays,
//! AI results) and what happens to them in a file set, so that a receiving clinic never
//! takes one for a diagnostic image (seed talk 3). Each route sets its own policy
//! (`[route.NAME.ai_support]` in `conf/cloudpdi.toml`); the defaults are here.

use serde::{Deserialize, Serialize};

use super::instance::Instance;
use super::tags;

/// The words every label uses (README.TXT, INDEX.HTM, manifest, Series Description).
pub const LABEL: &str = "AI support image, not a diagnosis";

/// What happens to an instance a rule recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AiAction {
    /// Travels like any other instance.
    Include,
    /// Left out of the file set (listed by UID in the manifest as excluded).
    Exclude,
    /// Travels, listed as "AI support image, not a diagnosis".
    Label,
}

impl std::str::FromStr for AiAction {
    type Err = String;

    /// The words of the configuration file and of `--ai-action`.
    fn from_str(text: &str) -> Result<AiAction, String> {
        match text.trim() {
            "include" => Ok(AiAction::Include),
            "exclude" => Ok(AiAction::Exclude),
            "label" => Ok(AiAction::Label),
            other => Err(format!(
                "{other:?} is not an AI support-image action: use include, exclude or label"
            )),
        }
    }
}

impl std::fmt::Display for AiAction {
    /// The word [`str::parse`] reads back, so defaults print as they are typed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AiAction::Include => "include",
            AiAction::Exclude => "exclude",
            AiAction::Label => "label",
        })
    }
}

/// One rule: every field that is set must match (fields of one rule are AND-ed; rules are
/// OR-ed). Text patterns are case-insensitive globs (`*` any text, `?` one character).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AiRule {
    /// SOP Class UID, exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sop_class: Option<String>,
    /// Pattern one of the Image Type (0008,0008) values must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_type: Option<String>,
    /// Pattern for Manufacturer (0008,0070).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    /// Pattern for Series Description (0008,103E).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series_description: Option<String>,
    /// A private tag `gggg,eeee` (hex) that must be present; with `private_creator`, the
    /// element's high byte is the block reserved by that creator, whatever it is in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_tag: Option<String>,
    /// Private Creator of `private_tag`'s block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_creator: Option<String>,
    /// Pattern the private tag's value must match (any value when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_value: Option<String>,
}

/// A route's policy for AI support images.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AiPolicy {
    /// What happens to a recognised instance.
    pub action: AiAction,
    /// With `label`: also prefix the instance's Series Description with the label (the
    /// file is then re-written; otherwise every file travels byte for byte).
    pub mark_series_description: bool,
    /// Rules that recognise AI support images.
    #[serde(rename = "rule")]
    pub rules: Vec<AiRule>,
}

/// Why a policy cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("AI support-image rule {index}: {why}")]
pub struct PolicyError {
    /// 1-based number of the rule.
    pub index: usize,
    /// What is wrong.
    pub why: String,
}

impl Default for AiPolicy {
    /// Label, do not rewrite files, and recognise: the CAD SR classes (mammography, chest,
    /// colon), Image Type values `CAD` or `AI`, and Series Descriptions that say CAD or AI.
    fn default() -> Self {
        let sop = |uid: &str| AiRule {
            sop_class: Some(uid.into()),
            ..AiRule::default()
        };
        let description = |pattern: &str| AiRule {
            series_description: Some(pattern.into()),
            ..AiRule::default()
        };
        let image_type = |pattern: &str| AiRule {
            image_type: Some(pattern.into()),
            ..AiRule::default()
        };
        AiPolicy {
            action: AiAction::Label,
            mark_series_description: false,
            rules: vec![
                sop("1.2.840.10008.5.1.4.1.1.88.50"),
                sop("1.2.840.10008.5.1.4.1.1.88.65"),
                sop("1.2.840.10008.5.1.4.1.1.88.69"),
                image_type("CAD"),
                image_type("AI"),
                description("*CAD*"),
                description("AI *"),
                description("* AI *"),
                description("*(AI)*"),
            ],
        }
    }
}

impl AiPolicy {
    /// Checks that every rule says something and names a valid private tag.
    ///
    /// # Errors
    /// [`PolicyError`] naming the rule.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (i, rule) in self.rules.iter().enumerate() {
            let error = |why: &str| PolicyError {
                index: i + 1,
                why: why.into(),
            };
            if *rule == AiRule::default() {
                return Err(error("names no attribute to match"));
            }
            if let Some(tag) = &rule.private_tag {
                let parsed = parse_tag(tag).ok_or_else(|| {
                    error("private_tag must be gggg,eeee in hexadecimal, e.g. 0029,1010")
                })?;
                if (parsed >> 16) % 2 == 0 {
                    return Err(error("private_tag must be in an odd (private) group"));
                }
            } else if rule.private_creator.is_some() || rule.private_value.is_some() {
                return Err(error(
                    "private_creator and private_value need a private_tag",
                ));
            }
        }
        Ok(())
    }

    /// The action for an instance: `None` when no rule recognises it.
    pub fn decide(&self, instance: &Instance) -> Option<AiAction> {
        self.rules
            .iter()
            .any(|rule| rule_matches(rule, instance))
            .then_some(self.action)
    }
}

/// Parses `gggg,eeee` or `ggggeeee` (hex, optional parentheses) into a tag number.
pub fn parse_tag(text: &str) -> Option<u32> {
    let text = text.trim().trim_start_matches('(').trim_end_matches(')');
    let (group, element) = match text.split_once(',') {
        Some(pair) => pair,
        None if text.len() == 8 => text.split_at(4),
        None => return None,
    };
    let group = u16::from_str_radix(group.trim(), 16).ok()?;
    let element = u16::from_str_radix(element.trim(), 16).ok()?;
    Some((u32::from(group) << 16) | u32::from(element))
}

fn rule_matches(rule: &AiRule, instance: &Instance) -> bool {
    let text = |tag| instance.text(tag);
    rule.sop_class
        .as_ref()
        .is_none_or(|uid| instance.sop_class_uid == uid.trim())
        && rule.image_type.as_ref().is_none_or(|pattern| {
            text(tags::IMAGE_TYPE)
                .split('\\')
                .any(|value| glob(pattern, value.trim()))
        })
        && rule
            .manufacturer
            .as_ref()
            .is_none_or(|pattern| glob(pattern, &text(tags::MANUFACTURER)))
        && rule
            .series_description
            .as_ref()
            .is_none_or(|pattern| glob(pattern, &text(tags::SERIES_DESCRIPTION)))
        && rule
            .private_tag
            .as_ref()
            .is_none_or(|tag| private_matches(rule, tag, instance))
}

fn private_matches(rule: &AiRule, tag: &str, instance: &Instance) -> bool {
    let Some(mut tag) = parse_tag(tag) else {
        return false;
    };
    if let Some(creator) = &rule.private_creator {
        let group = tag >> 16;
        let block = (0x10..=0xFF).find(|block| {
            instance
                .text((group << 16) | block)
                .eq_ignore_ascii_case(creator.trim())
        });
        let Some(block) = block else {
            return false;
        };
        tag = (group << 16) | (block << 8) | (tag & 0xFF);
    }
    let Some(element) = instance.element(tag) else {
        return false;
    };
    rule.private_value
        .as_ref()
        .is_none_or(|pattern| glob(pattern, &element.text().unwrap_or_default()))
}

/// Case-insensitive glob: `*` matches any text, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Parses a CLI rule `key=value,key=value` (keys as in the configuration). A value may
/// hold commas: text after a comma that is not `key=` continues the value before it, so
/// `private_tag=0029,1001,private_creator=ACME` sets `private_tag` to `0029,1001`.
///
/// # Errors
/// A message naming the unknown key or the text without a `key=`.
pub fn parse_rule(text: &str) -> Result<AiRule, String> {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for part in text.split(',') {
        match (part.split_once('='), pairs.last_mut()) {
            (Some((key, value)), _) => pairs.push((key.trim(), value.to_owned())),
            (None, Some((_, value))) => {
                value.push(',');
                value.push_str(part);
            }
            (None, None) if part.trim().is_empty() => {}
            (None, None) => return Err(format!("{part:?}: expected key=value")),
        }
    }
    let mut rule = AiRule::default();
    for (key, value) in pairs {
        let value = Some(value.trim().trim_end_matches(',').trim().to_owned());
        match key {
            "sop_class" => rule.sop_class = value,
            "image_type" => rule.image_type = value,
            "manufacturer" => rule.manufacturer = value,
            "series_description" => rule.series_description = value,
            "private_tag" => rule.private_tag = value,
            "private_creator" => rule.private_creator = value,
            "private_value" => rule.private_value = value,
            other => {
                return Err(format!(
                    "unknown rule key {other:?} (sop_class, image_type, manufacturer, \
                     series_description, private_tag, private_creator, private_value)"
                ));
            }
        }
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell_ignoring_case() {
        assert!(glob("*CAD*", "Chest cad overlay"));
        assert!(glob("AI *", "ai result"));
        assert!(!glob("AI *", "AXIAL 1.0"));
        assert!(glob("CT?", "ct1"));
        assert!(!glob("* AI *", "PAIN"));
        assert!(glob("", ""));
    }

    #[test]
    fn a_rule_value_may_hold_commas() {
        let rule = parse_rule("private_tag=0029,1001,private_creator=ACME AI, private_value=X*")
            .expect("the gggg,eeee form");
        assert_eq!(rule.private_tag.as_deref(), Some("0029,1001"));
        assert_eq!(rule.private_creator.as_deref(), Some("ACME AI"));
        assert_eq!(rule.private_value.as_deref(), Some("X*"));
        let rule = parse_rule("series_description=CT, AI result,").expect("comma in a pattern");
        assert_eq!(rule.series_description.as_deref(), Some("CT, AI result"));
        assert!(parse_rule("0029,1001").is_err());
        assert!(parse_rule("manufacturer=A,colour=red").is_err());
    }

    #[test]
    fn actions_read_and_print_as_typed() {
        for action in [AiAction::Include, AiAction::Exclude, AiAction::Label] {
            assert_eq!(action.to_string().parse::<AiAction>(), Ok(action));
        }
        assert!("Label!".parse::<AiAction>().is_err());
    }

    #[test]
    fn defaults_are_valid() {
        AiPolicy::default()
            .validate()
            .expect("default rules are valid");
        assert!(
            AiPolicy {
                rules: vec![AiRule::default()],
                ..AiPolicy::default()
            }
            .validate()
            .is_err()
        );
    }
}
