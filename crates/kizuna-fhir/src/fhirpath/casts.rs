//! Casts over collections, as R4's SearchParameters write them.
//!
//! FHIRPath makes `x as T` (and `x.as(T)`) an error when `x` holds more than one item, yet R4
//! defines parameters such as `component-value-quantity` as `(Observation.component.value as
//! Quantity)`: read strictly, a blood pressure with two components would have no value for it.
//! Servers read these casts as filters (Blaze, IBM FHIR); [`FhirPath::with_casts_as_filters`] does
//! the same by rewriting them into `ofType(T)`, which is the filter FHIRPath has.

use super::parse::Expr;
use super::FhirPath;
use crate::model::TypeModel;

impl FhirPath {
    /// This expression with every cast (`x as T`, `x.as(T)`) read as `x.ofType(T)`.
    ///
    /// On one item or none the two agree; on several, the cast is an error and `ofType` keeps
    /// the items of that type. [`FhirPath::source`] stays the text as written.
    pub fn with_casts_as_filters(&self) -> FhirPath {
        FhirPath {
            expr: as_filters(&self.expr),
            source: self.source.clone(),
        }
    }

    /// Whether some cast in the expression may have several items before it, on resources of
    /// type `base`: a repeating element on the cast's path, or a path the model cannot follow.
    /// Only there does [`FhirPath::with_casts_as_filters`] give a different result.
    pub fn casts_may_repeat(&self, model: &TypeModel, base: &str) -> bool {
        casts_repeat(&self.expr, model, base)
    }
}

fn as_filters(e: &Expr) -> Expr {
    let b = |x: &Expr| Box::new(as_filters(x));
    match e {
        Expr::As(inner, ty) => Expr::Call(Some(b(inner)), "ofType".into(), vec![type_expr(ty)]),
        Expr::Call(recv, name, args) => {
            let name = if name == "as" && recv.is_some() {
                "ofType".to_string()
            } else {
                name.clone()
            };
            Expr::Call(
                recv.as_deref().map(b),
                name,
                args.iter().map(as_filters).collect(),
            )
        }
        Expr::Member(x, n) => Expr::Member(b(x), n.clone()),
        Expr::Indexer(x, i) => Expr::Indexer(b(x), b(i)),
        Expr::Neg(x) => Expr::Neg(b(x)),
        Expr::Binary(op, l, r) => Expr::Binary(*op, b(l), b(r)),
        Expr::Is(x, t) => Expr::Is(b(x), t.clone()),
        other => other.clone(),
    }
}

/// `FHIR.Quantity` as the argument `ofType` reads: a member chain of identifiers.
fn type_expr(ty: &str) -> Expr {
    let mut parts = ty.split('.');
    let first = Expr::Ident(parts.next().unwrap_or_default().to_string());
    parts.fold(first, |acc, p| Expr::Member(Box::new(acc), p.to_string()))
}

fn casts_repeat(e: &Expr, model: &TypeModel, base: &str) -> bool {
    let sub = |x: &Expr| casts_repeat(x, model, base);
    match e {
        Expr::As(inner, _) => may_repeat(inner, model, base) || sub(inner),
        Expr::Call(recv, name, args) => {
            let cast = name == "as" && recv.as_deref().is_some_and(|r| may_repeat(r, model, base));
            cast || recv.as_deref().is_some_and(sub) || args.iter().any(sub)
        }
        Expr::Member(x, _) | Expr::Neg(x) | Expr::Is(x, _) => sub(x),
        Expr::Indexer(x, i) => sub(x) || sub(i),
        Expr::Binary(_, l, r) => sub(l) || sub(r),
        _ => false,
    }
}

/// True unless the path is one the model follows and no step on it repeats.
fn may_repeat(e: &Expr, model: &TypeModel, base: &str) -> bool {
    !matches!(path_shape(e, model, base), Some((_, false)))
}

/// The type a path leads to (`None` after a choice of several types) and whether any step on
/// it repeats; `None` when the path is not a plain member chain the model knows.
fn path_shape(e: &Expr, model: &TypeModel, base: &str) -> Option<(Option<String>, bool)> {
    match e {
        Expr::Ident(t) if t.starts_with(|c: char| c.is_ascii_uppercase()) => {
            model.get(t).map(|_| (Some(t.clone()), false))
        }
        Expr::Ident(name) => step(model, base, name, false),
        Expr::Member(x, name) => {
            let (ty, many) = path_shape(x, model, base)?;
            step(model, &ty?, name, many)
        }
        _ => None,
    }
}

fn step(model: &TypeModel, ty: &str, name: &str, many: bool) -> Option<(Option<String>, bool)> {
    let el = model.element(ty, name)?;
    let next = match el.types.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    };
    Some((next, many || el.many))
}

#[cfg(test)]
mod tests {
    use super::super::{EvalContext, FhirPath, Item};
    use crate::Registry;
    use serde_json::json;

    #[test]
    fn a_cast_over_several_components_keeps_those_of_the_type() {
        let reg = Registry::builtin();
        let bp = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "血圧"},
        "component": [
            {"code": {"text": "収縮期"}, "valueQuantity": {"value": 120, "unit": "mmHg"}},
            {"code": {"text": "所見"}, "valueString": "座位"},
            {"code": {"text": "拡張期"}, "valueQuantity": {"value": 80, "unit": "mmHg"}}
        ]});
        let strict = FhirPath::parse("(Observation.component.value as Quantity)").unwrap();
        let ctx = EvalContext::new(reg.model()).with_resource(&bp);
        assert!(strict.evaluate_resource(&ctx, &bp).is_err());
        let lenient = strict.with_casts_as_filters();
        let out = lenient.evaluate_resource(&ctx, &bp).unwrap();
        let values: Vec<_> = out
            .iter()
            .filter_map(|i| match i {
                Item::Node(n) => n.value,
                _ => None,
            })
            .map(|v| v["value"].to_string())
            .collect();
        assert_eq!(values, ["120", "80"]);
        // The function form too, and one item reads as before.
        let f = FhirPath::parse("Observation.component.value.as(Quantity)")
            .unwrap()
            .with_casts_as_filters();
        assert_eq!(f.evaluate_resource(&ctx, &bp).unwrap().len(), 2);
        let single = FhirPath::parse("(Observation.value as Quantity)").unwrap();
        let one = json!({"resourceType": "Observation", "valueQuantity": {"value": 1}});
        let ctx1 = EvalContext::new(reg.model()).with_resource(&one);
        assert_eq!(
            single.evaluate_resource(&ctx1, &one).unwrap().len(),
            single
                .with_casts_as_filters()
                .evaluate_resource(&ctx1, &one)
                .unwrap()
                .len()
        );
        assert_eq!(single.evaluate_resource(&ctx1, &one).unwrap().len(), 1);
    }

    #[test]
    fn only_casts_after_a_repeating_element_are_told_apart() {
        let reg = Registry::builtin();
        let m = reg.model();
        let may = |src: &str, base: &str| FhirPath::parse(src).unwrap().casts_may_repeat(m, base);
        assert!(may(
            "(Observation.component.value as Quantity)",
            "Observation"
        ));
        assert!(may(
            "Observation.component.value.as(Quantity)",
            "Observation"
        ));
        assert!(may(
            "(ActivityDefinition.useContext.value as CodeableConcept)",
            "ActivityDefinition"
        ));
        assert!(!may("(Observation.value as Quantity)", "Observation"));
        assert!(!may(
            "Condition.onset.as(Age) | Condition.onset.as(Range)",
            "Condition"
        ));
        assert!(!may("Observation.code", "Observation"));
        // A path the model cannot follow counts as repeating.
        assert!(may("(Observation.nothing as Quantity)", "Observation"));
    }
}
