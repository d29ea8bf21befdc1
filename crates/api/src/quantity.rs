//! Kubernetes resource quantities (`10Gi`, `500M`, `1.5e9`) as numbers, for the nix.conf byte
//! settings the agent writes and for comparing what the API server canonicalized.

/// A quantity that is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a Kubernetes quantity; write it like 10Gi, 500Mi or 2G")]
pub struct QuantityError(pub String);

/// The value of a quantity, as f64 (exact for every byte size a store can have).
pub fn parse(q: &str) -> Result<f64, QuantityError> {
    let err = || QuantityError(q.to_string());
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err());
    }
    let n: f64 = number.parse().map_err(|_| err())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| err())?;
            10f64.powi(exp)
        }
        _ => return Err(err()),
    };
    Ok(n * scale)
}

/// A quantity of bytes, rounded up.
pub fn to_bytes(q: &str) -> Result<u64, QuantityError> {
    let v = parse(q)?;
    if v < 0.0 {
        return Err(QuantityError(q.to_string()));
    }
    Ok(v.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_exponent_forms() {
        assert_eq!(to_bytes("10Gi").unwrap(), 10 * 1024 * 1024 * 1024);
        assert_eq!(to_bytes("500M").unwrap(), 500_000_000);
        assert_eq!(to_bytes("1.5e3").unwrap(), 1500);
        assert_eq!(to_bytes("1024").unwrap(), 1024);
        assert_eq!(parse("100m").unwrap(), 0.1);
        assert_eq!(parse("1Gi").unwrap(), parse("1024Mi").unwrap());
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in ["", "Gi", "10 GB", "10gb", "ten", "-1Gi"] {
            assert!(to_bytes(bad).is_err(), "{bad} should be refused");
        }
    }
}
