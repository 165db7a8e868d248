//! Route matching. The most specific path wins (a static segment beats a
//! parameter, which beats a catch-all: matchit's own priority), and among the
//! routes on one path a route that lists the request's method beats one that
//! lists none. A route that lists other methods does not match at all, so the
//! request falls through to the next most specific path.
//!
//! To get that fall-through from a router that returns a single best match,
//! the compiled [`Router`] holds one matchit tree per method named anywhere in
//! the file (plus one for every other method). Each tree holds exactly the
//! routes that apply to its method, so one lookup answers the question.

use http::Method;

/// Index of a route in `Policy::routes`.
pub type RouteIdx = u32;

/// A route as the router needs it: its pattern and the methods it names.
pub struct RouteSpec<'a> {
    pub pattern: &'a str,
    pub methods: Option<&'a [Method]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The pattern is not valid matchit syntax.
    Invalid { route: usize, message: String },
    /// Two routes claim the same path and method, or paths matchit cannot tell apart.
    Conflict { route: usize, message: String },
}

#[derive(Default)]
pub struct Router {
    /// One tree per method named in some route.
    by_method: Vec<(Method, matchit::Router<RouteIdx>)>,
    /// Routes without `methods`, for every method no route names.
    any: matchit::Router<RouteIdx>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field(
                "methods",
                &self.by_method.iter().map(|(m, _)| m).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Build the router, reporting every invalid or conflicting route.
    pub fn build(routes: &[RouteSpec<'_>]) -> Result<Router, Vec<RouteError>> {
        let mut errors = Vec::new();

        // Syntax first, against a scratch tree per route, so a bad pattern is
        // reported once rather than once per method tree.
        let valid: Vec<bool> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut scratch = matchit::Router::new();
                match scratch.insert(r.pattern, ()) {
                    Ok(()) => true,
                    Err(e) => {
                        errors.push(RouteError::Invalid {
                            route: i,
                            message: describe(&e),
                        });
                        false
                    }
                }
            })
            .collect();

        let mut methods: Vec<Method> = Vec::new();
        for r in routes.iter().filter_map(|r| r.methods) {
            for m in r {
                if !methods.contains(m) {
                    methods.push(m.clone());
                }
            }
        }

        let mut router = Router::default();
        let mut conflicts = Conflicts::default();
        for method in &methods {
            let tree = fill_tree(routes, &valid, Some(method), &mut conflicts);
            router.by_method.push((method.clone(), tree));
        }
        router.any = fill_tree(routes, &valid, None, &mut conflicts);
        errors.extend(conflicts.0);

        if errors.is_empty() {
            Ok(router)
        } else {
            Err(errors)
        }
    }

    /// The route that applies to `method` and `path`, if any.
    pub fn lookup(&self, method: &Method, path: &str) -> Option<RouteIdx> {
        let tree = self
            .by_method
            .iter()
            .find(|(m, _)| m == method)
            .map_or(&self.any, |(_, t)| t);
        tree.at(path).ok().map(|m| *m.value)
    }
}

#[derive(Default)]
struct Conflicts(Vec<RouteError>);

impl Conflicts {
    /// One error per route is enough to send the operator to it.
    fn push(&mut self, route: usize, message: String) {
        let known = self.0.iter().any(|e| {
            matches!(e, RouteError::Conflict { route: r, .. } | RouteError::Invalid { route: r, .. } if *r == route)
        });
        if !known {
            self.0.push(RouteError::Conflict { route, message });
        }
    }
}

/// The tree for one method (`None`: methods no route names). A route that
/// names the method is inserted first; a method-less route then fills the
/// paths it left free.
fn fill_tree(
    routes: &[RouteSpec<'_>],
    valid: &[bool],
    method: Option<&Method>,
    conflicts: &mut Conflicts,
) -> matchit::Router<RouteIdx> {
    let mut tree = matchit::Router::new();
    let mut owner: Vec<(&str, usize)> = Vec::new();

    let specific = routes.iter().enumerate().filter(|(i, r)| {
        valid[*i] && matches!((method, r.methods), (Some(m), Some(ms)) if ms.contains(m))
    });
    let general = routes
        .iter()
        .enumerate()
        .filter(|(i, r)| valid[*i] && r.methods.is_none());

    for (pass, candidates) in [(0, specific.collect::<Vec<_>>()), (1, general.collect())] {
        for (i, route) in candidates {
            for path in paths_for(route.pattern) {
                let implied = path != route.pattern;
                match tree.insert(path.clone(), i as RouteIdx) {
                    Ok(()) => owner.push((route.pattern, i)),
                    Err(matchit::InsertError::Conflict { with }) => {
                        if implied {
                            // an explicit route already took `/prefix/`
                            continue;
                        }
                        let other = owner
                            .iter()
                            .find(|(p, _)| paths_for(p).contains(&with))
                            .map(|(_, o)| *o);
                        let other_general = other.is_some_and(|o| routes[o].methods.is_none());
                        // A method-less route yields to a method-specific one
                        // on the same path by design; clashes between two
                        // method-less routes are reported from `any` alone.
                        if pass == 1 && (!other_general || method.is_some()) {
                            continue;
                        }
                        let with = other.map_or(with, |o| routes[o].pattern.to_string());
                        let message = match method.filter(|_| pass == 0) {
                            Some(m) => format!(
                                "route {:?} for {m} conflicts with route {with:?} defined earlier",
                                route.pattern
                            ),
                            None => format!(
                                "route {:?} conflicts with route {with:?} defined earlier",
                                route.pattern
                            ),
                        };
                        conflicts.push(i, message);
                    }
                    Err(e) => conflicts.push(i, describe(&e)),
                }
            }
        }
    }
    tree
}

/// A catch-all route `/p/{*rest}` also answers `/p/`, which matchit alone
/// would not match (the catch-all must not be empty).
fn paths_for(pattern: &str) -> Vec<String> {
    let mut paths = vec![pattern.to_string()];
    if let Some(start) = pattern.rfind("/{*") {
        if pattern.ends_with('}') {
            paths.push(pattern[..=start].to_string());
        }
    }
    paths
}

fn describe(e: &matchit::InsertError) -> String {
    match e {
        matchit::InsertError::Conflict { with } => format!("conflicts with route {with:?}"),
        matchit::InsertError::InvalidParamSegment => {
            "only one parameter is allowed per path segment".to_string()
        }
        matchit::InsertError::InvalidParam => {
            "a parameter needs a name in matching braces, like {id}".to_string()
        }
        matchit::InsertError::InvalidCatchAll => {
            "a catch-all like {*rest} may only end the path".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(specs: &[(&str, Option<Vec<Method>>)]) -> Result<Router, Vec<RouteError>> {
        let specs: Vec<RouteSpec<'_>> = specs
            .iter()
            .map(|(p, m)| RouteSpec {
                pattern: p,
                methods: m.as_deref(),
            })
            .collect();
        Router::build(&specs)
    }

    #[test]
    fn static_segment_beats_parameter_beats_catch_all() {
        let r = build(&[
            ("/v1/{*rest}", None),
            ("/v1/vms/{id}", None),
            ("/v1/vms/new", None),
        ])
        .unwrap();
        assert_eq!(r.lookup(&Method::GET, "/v1/vms/new"), Some(2));
        assert_eq!(r.lookup(&Method::GET, "/v1/vms/42"), Some(1));
        assert_eq!(r.lookup(&Method::GET, "/v1/images/1"), Some(0));
        assert_eq!(r.lookup(&Method::GET, "/v2/x"), None);
    }

    #[test]
    fn method_specific_route_beats_method_less_on_same_path() {
        let r = build(&[
            ("/v1/vms/{id}", None),
            ("/v1/vms/{id}", Some(vec![Method::DELETE])),
        ])
        .unwrap();
        assert_eq!(r.lookup(&Method::DELETE, "/v1/vms/1"), Some(1));
        assert_eq!(r.lookup(&Method::GET, "/v1/vms/1"), Some(0));
        assert_eq!(r.lookup(&Method::PATCH, "/v1/vms/1"), Some(0));
    }

    #[test]
    fn other_method_falls_through_to_less_specific_path() {
        let r = build(&[
            ("/v1/{*rest}", None),
            ("/v1/vms/{id}", Some(vec![Method::DELETE])),
        ])
        .unwrap();
        assert_eq!(r.lookup(&Method::DELETE, "/v1/vms/1"), Some(1));
        assert_eq!(r.lookup(&Method::GET, "/v1/vms/1"), Some(0));
    }

    #[test]
    fn catch_all_also_matches_its_bare_prefix() {
        let r = build(&[("/v1/{*rest}", None), ("/{*all}", None)]).unwrap();
        assert_eq!(r.lookup(&Method::GET, "/v1/"), Some(0));
        assert_eq!(r.lookup(&Method::GET, "/"), Some(1));
        assert_eq!(r.lookup(&Method::GET, "/v1"), Some(1));
    }

    #[test]
    fn duplicate_path_and_method_is_a_conflict() {
        let errors = build(&[
            ("/a/{id}", Some(vec![Method::GET])),
            ("/a/{id}", Some(vec![Method::GET, Method::POST])),
            ("/b", None),
            ("/b", None),
        ])
        .unwrap_err();
        let routes: Vec<usize> = errors
            .iter()
            .map(|e| match e {
                RouteError::Conflict { route, .. } | RouteError::Invalid { route, .. } => *route,
            })
            .collect();
        assert_eq!(routes, vec![1, 3]);
    }

    #[test]
    fn differently_named_parameters_conflict() {
        assert!(build(&[("/a/{id}", None), ("/a/{name}", None)]).is_err());
    }

    #[test]
    fn invalid_patterns_are_reported_each_once() {
        let errors =
            build(&[("/a/{*rest}/b", None), ("/b/{x", Some(vec![Method::GET]))]).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(matches!(errors[0], RouteError::Invalid { route: 0, .. }));
    }
}
