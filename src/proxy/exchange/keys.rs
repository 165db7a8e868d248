//! The self-service key API on the public listener: route the path under
//! `[auth.self_service]`, authenticate the caller through the gate (a
//! user's JWT, or a key holding `keys:manage`), then run the operation on
//! the blocking pool and answer its JSON, never cached.

use http::Method;

use super::{Downstream, Refusal, Req, Step};
use crate::gate::{self, Denial, Holder, RequestFacts};
use crate::keys::manage::{Actor, KeyError, Op, MANAGE};
use crate::proxy::dispatch::Endpoint;

/// What a path under the key API names.
enum Target<'a> {
    Collection,
    Key(&'a str),
    Roll(&'a str),
    Account,
}

impl<D: Downstream> Req<'_, D> {
    pub(super) async fn serve_keys(&mut self, endpoint: Endpoint) -> Step {
        let policy = self.x.policy.clone();
        let Some(settings) = policy.auth.self_service.clone() else {
            return self.refuse(Refusal::Gate(Denial::Forbidden)).await;
        };
        let path = self.x.path.clone();
        let target = if endpoint == Endpoint::AccountAllow {
            Target::Account
        } else {
            let rest = path[settings.path.len()..].trim_start_matches('/');
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                [""] => Target::Collection,
                [id] if id.starts_with("key_") => Target::Key(id),
                [id, "roll"] if id.starts_with("key_") => Target::Roll(id),
                _ => return self.refuse(Refusal::Keys(KeyError::NotFound)).await,
            }
        };
        let method = &self.head.method;
        let allowed = match target {
            Target::Collection => [Method::GET, Method::POST].contains(method).then_some(()),
            Target::Key(_) => [Method::GET, Method::PATCH, Method::DELETE]
                .contains(method)
                .then_some(()),
            Target::Roll(_) => (*method == Method::POST).then_some(()),
            Target::Account => [Method::GET, Method::PUT].contains(method).then_some(()),
        };
        if allowed.is_none() {
            let allow = match target {
                Target::Collection => "GET, POST",
                Target::Key(_) => "GET, PATCH, DELETE",
                Target::Roll(_) => "POST",
                Target::Account => "GET, PUT",
            };
            return self.refuse(Refusal::MethodNotAllowed(allow)).await;
        }
        let actor = match self.key_actor().await? {
            Ok(actor) => actor,
            Err(refusal) => return self.refuse(refusal).await,
        };
        let body = if [Method::POST, Method::PATCH, Method::PUT].contains(method) {
            match self.read_body(crate::issue::MAX_BODY).await? {
                Ok(body) => body,
                Err(refusal) => return self.refuse(refusal).await,
            }
        } else {
            Vec::new()
        };
        let keys = self.worker.shared.keys.clone();
        let throttles = self.worker.shared.issuer.throttles.clone();
        let method = method.clone();
        let id = match target {
            Target::Key(id) | Target::Roll(id) => id.to_string(),
            _ => String::new(),
        };
        let is_roll = matches!(target, Target::Roll(_));
        let is_account = matches!(target, Target::Account);
        let answer = tokio::task::spawn_blocking(move || {
            let op = match (is_account, is_roll, &method, id.as_str()) {
                (true, _, &Method::GET, _) => Op::GetAllow,
                (true, _, _, _) => Op::PutAllow(&body),
                (_, true, _, id) => Op::Roll(id, &body),
                (_, _, &Method::GET, "") => Op::List,
                (_, _, _, "") => Op::Create(&body),
                (_, _, &Method::GET, id) => Op::Get(id),
                (_, _, &Method::PATCH, id) => Op::Update(id, &body),
                (_, _, _, id) => Op::Revoke(id),
            };
            let now_us = crate::clock::unix_now_us();
            let throttle = |need: &crate::limit::QuotaNeed| {
                crate::keys::manage::spend(throttles.as_ref(), need, now_us)
            };
            keys.run(
                &policy,
                &settings,
                &actor,
                op,
                now_us / 1_000_000,
                &throttle,
            )
        })
        .await
        .unwrap_or(Err(KeyError::Unavailable));
        match answer {
            Ok(reply) => {
                self.x.subject = Some(reply.subject);
                self.answer(reply.status, "no-store", &reply.body, |out| {
                    out.field(b"pragma", b"no-cache");
                })
                .await
            }
            Err(e) => self.refuse(Refusal::Keys(e)).await,
        }
    }

    /// Who calls the key API: authenticated like any request (a key the
    /// cache does not know is looked up), then a JWT's user, or a key
    /// with an owner and `keys:manage`.
    async fn key_actor(&mut self) -> Result<Result<Actor, Refusal>, super::Gone> {
        let policy = self.x.policy.clone();
        let keys = self.worker.shared.keys.clone();
        let mut now_us = crate::clock::unix_now_us();
        let mut looked_up = false;
        let decision = loop {
            let decision = {
                let view = self.view();
                let facts = RequestFacts {
                    peer: self.origin.peer,
                    client_ip: Some(self.x.client_ip),
                    method: &self.head.method,
                    path: &self.x.path,
                    headers: &view,
                    client_cert: self.origin.client_cert(),
                    stored: Some(&*keys),
                };
                gate::authenticate(&policy, &facts, now_us)
            };
            match decision.lookup {
                Some(hash) if !looked_up => {
                    looked_up = true;
                    let found = keys.fetch(hash, self.x.client_ip, now_us).await;
                    if matches!(found, gate::Lookup::Refused) {
                        return Ok(Err(Refusal::Gate(Denial::KeyLookupsThrottled)));
                    }
                    now_us = crate::clock::unix_now_us();
                }
                _ => break decision,
            }
        };
        let verdict = decision.verdict.clone();
        let principal = decision.principal.clone();
        self.x.decision = Some(decision);
        if let Err(denial) = verdict {
            return Ok(Err(Refusal::Gate(denial)));
        }
        let Some(principal) = principal else {
            return Ok(Err(Refusal::Gate(Denial::MissingCredentials)));
        };
        let insufficient = || {
            Ok(Err(Refusal::Gate(Denial::InsufficientPermissions(
                MANAGE.into(),
            ))))
        };
        let Some(owner) = principal.user() else {
            return insufficient();
        };
        let label = match &principal.holder {
            Holder::User(_) => format!("user:{}", policy.user(owner).id),
            _ if !principal.holds(&policy, MANAGE) => return insufficient(),
            _ => format!("key:{}", principal.key_id(&policy).unwrap_or("-")),
        };
        let ceiling = principal.permissions(&policy).into_owned();
        Ok(Ok(Actor {
            owner,
            label,
            ceiling,
            client_ip: Some(self.x.client_ip),
            operator: false,
        }))
    }
}
