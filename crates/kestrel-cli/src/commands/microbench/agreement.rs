//! How closely the fused implementation's outputs match the reference's.

use serde::Serialize;

use super::spec::Compare;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Agreement {
    /// Values compared.
    pub compared: usize,
    pub max_abs: f64,
    /// `max_abs` over the largest reference magnitude.
    pub max_rel: f64,
    /// Values that differ at all (ids: any difference is a mismatch).
    pub mismatches: usize,
    /// Values that are NaN or infinite on either side.
    pub non_finite: usize,
    /// The bound `max_rel` must stay within (0 for ids: exact).
    pub tolerance: f64,
    pub ok: bool,
}

pub fn compare(reference: &[f32], fused: &[f32], how: Compare) -> Agreement {
    let mut max_abs = 0f64;
    let mut scale = 0f64;
    let mut mismatches = 0;
    let mut non_finite = 0;
    for (&r, &f) in reference.iter().zip(fused) {
        if !r.is_finite() || !f.is_finite() {
            non_finite += 1;
            continue;
        }
        let d = (r as f64 - f as f64).abs();
        max_abs = max_abs.max(d);
        scale = scale.max((r as f64).abs());
        if d > 0.0 {
            mismatches += 1;
        }
    }
    let max_rel = if max_abs == 0.0 {
        0.0
    } else {
        max_abs / scale.max(f64::MIN_POSITIVE)
    };
    let same_len = reference.len() == fused.len();
    let (tolerance, within) = match how {
        Compare::Relative(tol) => (tol, max_rel <= tol),
        Compare::Exact => (0.0, mismatches == 0),
    };
    Agreement {
        compared: reference.len().min(fused.len()),
        max_abs,
        max_rel,
        mismatches,
        non_finite,
        tolerance,
        ok: same_len && non_finite == 0 && within && !reference.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_against_the_largest_reference_value() {
        let a = compare(&[10.0, -1.0, 0.5], &[10.0, -1.001, 0.5], Compare::Relative(1e-3));
        assert!(
            (a.max_abs - 0.001).abs() < 1e-6 && (a.max_rel - 1e-4).abs() < 1e-7,
            "{a:?}"
        );
        assert!(a.ok);
        assert_eq!(a.mismatches, 1);
        assert!(!compare(&[1.0], &[1.1], Compare::Relative(1e-3)).ok);
    }

    #[test]
    fn ids_must_match_exactly_and_nan_or_length_fails() {
        assert!(compare(&[3.0, 7.0], &[3.0, 7.0], Compare::Exact).ok);
        assert!(!compare(&[3.0, 7.0], &[3.0, 8.0], Compare::Exact).ok);
        let n = compare(&[1.0, f32::NAN], &[1.0, f32::NAN], Compare::Relative(1.0));
        assert!(!n.ok && n.non_finite == 1);
        assert!(!compare(&[1.0, 2.0], &[1.0], Compare::Relative(1.0)).ok);
        assert!(!compare(&[], &[], Compare::Exact).ok);
    }
}
