//! Durations and source prefixes: Go/Kubernetes syntax in, the same syntax out.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration as Std;

use portsentry_crds::{Duration, SourcePrefix};

fn duration(text: &str) -> Std {
    text.parse::<Duration>().unwrap().as_std()
}

#[test]
fn go_durations_parse_with_every_unit() {
    assert_eq!(duration("1h30m"), Std::from_secs(5400));
    assert_eq!(duration("250ms"), Std::from_millis(250));
    assert_eq!(duration("1.5h"), Std::from_secs(5400));
    assert_eq!(duration("10us"), Std::from_micros(10));
    assert_eq!(duration("7ns"), Std::from_nanos(7));
    assert_eq!(duration("0"), Std::ZERO);
}

#[test]
fn malformed_durations_are_refused() {
    for bad in ["", "h", "5", "5x", "-1s", "1.s", "1..5s", "s5", "1h 30m"] {
        assert!(
            bad.parse::<Duration>().is_err(),
            "{bad:?} should be refused"
        );
    }
}

#[test]
fn durations_print_in_their_shortest_go_form_and_parse_back() {
    for (value, text) in [
        (Std::from_secs(5400), "1h30m"),
        (Std::from_secs(45), "45s"),
        (Std::from_millis(250), "250ms"),
        (Std::ZERO, "0s"),
        (Std::from_millis(1500), "1.5s"),
    ] {
        assert_eq!(Duration(value).to_string(), text);
        assert_eq!(duration(text), value);
    }
}

#[test]
fn a_bare_address_is_a_host_prefix() {
    let v4: SourcePrefix = "203.0.113.7".parse().unwrap();
    assert_eq!(v4.0.prefix_len(), 32);
    assert_eq!(v4.to_string(), "203.0.113.7");
    let v6: SourcePrefix = "2001:db8::1".parse().unwrap();
    assert_eq!(v6.0.prefix_len(), 128);
}

#[test]
fn cidrs_keep_their_length_and_can_be_truncated() {
    let net: SourcePrefix = "10.1.2.3/8".parse().unwrap();
    assert_eq!(net.to_string(), "10.1.2.3/8");
    assert_eq!(net.network().to_string(), "10.0.0.0/8");
    assert!(net.contains(&"10.200.0.1".parse().unwrap()));
    let v6: SourcePrefix = "2001:db8::/32".parse().unwrap();
    assert!(v6.contains(&"2001:db8:ffff::1".parse().unwrap()));
}

#[test]
fn malformed_addresses_are_refused_with_examples() {
    for bad in [
        "",
        "10.0.0",
        "10.0.0.0/33",
        "2001:db8::/129",
        "example.com",
        "10.0.0.1/",
    ] {
        let error = bad.parse::<SourcePrefix>().unwrap_err();
        assert!(
            error.to_string().contains("203.0.113.7"),
            "{bad:?}: {error}"
        );
    }
}
