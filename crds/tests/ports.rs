//! Port lists: what users may write, and what they get back.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use portsentry_crds::{PortError, PortRange, expand, parse_port_list};

#[test]
fn a_single_port_is_a_range_of_one() {
    let range: PortRange = "111".parse().unwrap();
    assert_eq!((range.start(), range.end()), (111, 111));
}

#[test]
fn an_ordered_range_covers_both_ends() {
    let range: PortRange = "30000-30010".parse().unwrap();
    assert_eq!(range.ports().count(), 11);
    assert!(range.contains(30000) && range.contains(30010) && !range.contains(30011));
}

#[test]
fn a_reversed_range_is_refused_with_the_fix() {
    let error = "40-30".parse::<PortRange>().unwrap_err();
    assert_eq!(error, PortError::Reversed { start: 40, end: 30 });
    assert!(error.to_string().contains("30-40"));
}

#[test]
fn port_zero_is_refused() {
    assert_eq!(
        "0".parse::<PortRange>().unwrap_err(),
        PortError::OutOfRange(0)
    );
}

#[test]
fn a_port_above_65535_is_refused() {
    assert_eq!(
        "65536".parse::<PortRange>().unwrap_err(),
        PortError::OutOfRange(65536)
    );
}

#[test]
fn words_are_not_ports() {
    assert!(matches!(
        "ssh".parse::<PortRange>(),
        Err(PortError::NotANumber(_))
    ));
    assert!(matches!("-5".parse::<PortRange>(), Err(PortError::Empty)));
}

#[test]
fn a_comma_list_keeps_every_item_including_ranges() {
    let list = parse_port_list("1, 7,9,30-32").unwrap();
    assert_eq!(
        expand(&list).into_iter().collect::<Vec<_>>(),
        vec![1, 7, 9, 30, 31, 32]
    );
}

#[test]
fn an_empty_item_in_a_comma_list_is_an_error_not_a_skip() {
    assert_eq!(parse_port_list("1,,7").unwrap_err(), PortError::Empty);
}

#[test]
fn single_ports_serialise_as_numbers_and_ranges_as_strings() {
    let list = vec![
        PortRange::single(80).unwrap(),
        PortRange::new(5, 11).unwrap(),
    ];
    assert_eq!(serde_json::to_string(&list).unwrap(), r#"[80,"5-11"]"#);
}

#[test]
fn numbers_and_strings_both_deserialise() {
    let list: Vec<PortRange> = serde_json::from_str(r#"[80,"81","5-11"]"#).unwrap();
    assert_eq!(
        list,
        vec![
            PortRange::single(80).unwrap(),
            PortRange::single(81).unwrap(),
            PortRange::new(5, 11).unwrap()
        ]
    );
}

#[test]
fn out_of_range_numbers_fail_to_deserialise() {
    assert!(serde_json::from_str::<PortRange>("70000").is_err());
    assert!(serde_json::from_str::<PortRange>("-1").is_err());
    assert!(serde_json::from_str::<PortRange>("0").is_err());
}
