//! `--kafka-option key=value`: extra librdkafka settings (TLS, SASL, fetch sizes)
//! that every Kafka-facing command accepts. Values may be secrets, so `Debug` hides them.

use std::fmt;
use std::str::FromStr;

/// One extra librdkafka setting.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaOption {
    pub key: String,
    pub value: String,
}

impl fmt::Debug for KafkaOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=<redacted>", self.key)
    }
}

impl FromStr for KafkaOption {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok(KafkaOption {
                key: key.trim().to_owned(),
                value: value.trim().to_owned(),
            }),
            _ => Err(format!(
                "expected key=value, found {:?}",
                text.split('=').next().unwrap_or_default()
            )),
        }
    }
}

impl KafkaOption {
    /// The first option whose key is in `protected`, if any.
    pub fn first_protected<'a>(
        options: &'a [KafkaOption],
        protected: &[&str],
    ) -> Option<&'a KafkaOption> {
        options
            .iter()
            .find(|option| protected.contains(&option.key.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_the_value() {
        let option: KafkaOption = " sasl.password = hunter2 "
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(option.key, "sasl.password");
        assert_eq!(option.value, "hunter2");
        assert_eq!(format!("{option:?}"), "sasl.password=<redacted>");
        assert!("novalue".parse::<KafkaOption>().is_err());
        assert!("=x".parse::<KafkaOption>().is_err());
    }

    #[test]
    fn finds_protected_keys() {
        let options = vec![
            "security.protocol=SSL"
                .parse()
                .unwrap_or_else(|e: String| panic!("{e}")),
            "acks=1".parse().unwrap_or_else(|e: String| panic!("{e}")),
        ];
        let found = KafkaOption::first_protected(&options, &["acks", "enable.idempotence"]);
        assert_eq!(found.map(|o| o.key.as_str()), Some("acks"));
        assert!(KafkaOption::first_protected(&options[..1], &["acks"]).is_none());
    }
}
