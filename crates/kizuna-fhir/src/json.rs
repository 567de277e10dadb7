//! Member lookup in parsed JSON objects, by scanning small ones instead of hashing.
//!
//! serde_json keeps an object's members in order in an `IndexMap` hashed with SipHash, which is
//! built to resist collision flooding rather than for speed: a lookup costs about 100
//! instructions, 65 of them hashing the key. Validation and index extraction look members up
//! millions of times (6,300 lookups per JP-CLINS submission), and FHIR objects are small: a
//! Coding has three members, a whole Patient rarely twenty. Up to [`SCAN_LIMIT`] members, a scan
//! that compares lengths before bytes finds a member (or its absence) for less; larger objects are
//! hashed as before. The answers are exactly those of `Map::get`.

use serde_json::{Map, Value};

/// Objects with at most this many members are scanned.
pub const SCAN_LIMIT: usize = 16;

/// The member `key` of an object (`Map::get`, without hashing small objects).
#[inline]
pub fn field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if map.len() <= SCAN_LIMIT {
        map.iter().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        map.get(key)
    }
}

/// The member `key` of a JSON value when it is an object (`Value::get` with a string key).
#[inline]
pub fn member<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => field(map, key),
        _ => None,
    }
}

/// Whether an object has the member `key` (`Map::contains_key`).
#[inline]
pub fn has_field(map: &Map<String, Value>, key: &str) -> bool {
    field(map, key).is_some()
}

/// The `_name` member holding a primitive's id and extensions, found without building the key
/// for small objects.
#[inline]
pub fn underscored<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if map.len() <= SCAN_LIMIT {
        return map.iter().find_map(|(k, v)| {
            (k.len() == name.len() + 1 && k.strip_prefix('_') == Some(name)).then_some(v)
        });
    }
    let mut buf = [0u8; 64];
    let n = name.len();
    if n < buf.len() {
        buf[0] = b'_';
        buf[1..=n].copy_from_slice(name.as_bytes());
        if let Ok(key) = std::str::from_utf8(&buf[..=n]) {
            return map.get(key);
        }
    }
    map.get(&format!("_{name}"))
}

/// `member("key")` on JSON values and objects: [`member`] and [`field`] in method form, for code
/// that reads many members.
pub trait Member {
    /// The member `key`, if this is an object that has it.
    fn member(&self, key: &str) -> Option<&Value>;
}

impl Member for Value {
    #[inline]
    fn member(&self, key: &str) -> Option<&Value> {
        member(self, key)
    }
}

impl Member for Map<String, Value> {
    #[inline]
    fn member(&self, key: &str) -> Option<&Value> {
        field(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn object(keys: &[String]) -> Map<String, Value> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), Value::from(i)))
            .collect()
    }

    proptest! {
        // Small and large objects, keys that share prefixes and lengths, present and absent.
        #[test]
        fn lookups_answer_as_the_map_does(
            keys in proptest::collection::vec("_?[a-c]{0,3}", 0..40),
            probe in "_?[a-c]{0,3}",
        ) {
            let map = object(&keys);
            prop_assert_eq!(field(&map, &probe), map.get(&probe));
            prop_assert_eq!(has_field(&map, &probe), map.contains_key(&probe));
            let value = Value::Object(map.clone());
            prop_assert_eq!(member(&value, &probe), value.get(&probe));
            prop_assert_eq!(value.member(&probe), value.get(&probe));
            prop_assert_eq!(map.member(&probe), map.get(&probe));
            let bare = probe.trim_start_matches('_');
            prop_assert_eq!(underscored(&map, bare), map.get(&format!("_{bare}")));
        }
    }

    #[test]
    fn non_objects_have_no_members() {
        for v in [
            Value::Null,
            Value::from(1),
            Value::from("a"),
            Value::Array(vec![]),
        ] {
            assert_eq!(member(&v, "a"), None);
        }
    }

    #[test]
    fn both_sides_of_the_limit_are_searched() {
        for n in [SCAN_LIMIT - 1, SCAN_LIMIT, SCAN_LIMIT + 1, 4 * SCAN_LIMIT] {
            let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            let map = object(&keys);
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(field(&map, k), Some(&Value::from(i)), "{n} members, {k}");
            }
            assert_eq!(field(&map, "absent"), None);
            let name = "x".repeat(70);
            let mut long = map.clone();
            long.insert(format!("_{name}"), Value::Bool(true));
            assert_eq!(underscored(&long, &name), Some(&Value::Bool(true)));
        }
    }
}
