//! Conditional interactions, JSON Patch, `$everything`, transactions with conditional entries and
//! references, batch, content negotiation (XML, gzip) — each checked through the HTTP API and
//! against what the store then holds.

mod common;

use std::io::{Read, Write};

use axum::http::StatusCode;
use base64::Engine;
use common::{call, json_body, raw, setup, T};
use serde_json::{json, Value};

const MEMBER: &str = "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID";

fn patient(member: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "gender": "female", "birthDate": "1960-02-03",
        "identifier": [{"system": MEMBER, "value": member}],
        "name": [{"family": family, "given": ["花子"]}]})
}

async fn count(t: &T, q: &str) -> i64 {
    call(t, "GET", &format!("/fhir/{q}&_summary=count"), None, &[])
        .await
        .1["total"]
        .as_i64()
        .unwrap_or(-1)
}

async fn create(t: &T, r: &Value) -> String {
    let rt = r["resourceType"].as_str().unwrap_or("");
    let (s, v, _) = call(t, "POST", &format!("/fhir/{rt}"), json_body(r), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn conditional_update_and_delete() {
    let t = setup(None).await;
    let q = format!("/fhir/Patient?identifier={MEMBER}|A:1:1:00");
    // No match: created.
    let (s, a, _) = call(&t, "PUT", &q, json_body(&patient("A:1:1:00", "佐藤")), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let id = a["id"].as_str().unwrap_or("").to_string();
    // One match: that resource is updated, whatever id the body lacks.
    let mut p = patient("A:1:1:00", "鈴木");
    let (s, b, _) = call(&t, "PUT", &q, json_body(&p), &[]).await;
    assert_eq!(
        (s, b["id"].as_str(), b["meta"]["versionId"].as_str()),
        (StatusCode::OK, Some(id.as_str()), Some("2"))
    );
    // A body naming another id is refused.
    p["id"] = json!("someone-else");
    let (s, oo, _) = call(&t, "PUT", &q, json_body(&p), &[]).await;
    assert_eq!(
        (s, oo["resourceType"].as_str()),
        (StatusCode::BAD_REQUEST, Some("OperationOutcome"))
    );
    // Two matches: 412, nothing changed.
    create(&t, &patient("A:1:1:00", "田中")).await;
    let (s, oo, _) = call(&t, "PUT", &q, json_body(&patient("A:1:1:00", "X")), &[]).await;
    assert_eq!(
        (s, oo["issue"][0]["code"].as_str()),
        (StatusCode::PRECONDITION_FAILED, Some("multiple-matches"))
    );
    assert_eq!(count(&t, "Patient?family=X").await, 0);
    // Conditional update without criteria is a 400, not an update of everything.
    let (s, _, _) = call(
        &t,
        "PUT",
        "/fhir/Patient",
        json_body(&patient("B", "Y")),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Conditional delete removes every match, and only those.
    create(&t, &patient("C:1:1:00", "残る")).await;
    let (s, _, _) = call(&t, "DELETE", &q, None, &[]).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        count(&t, &format!("Patient?identifier={MEMBER}|A:1:1:00")).await,
        0
    );
    assert_eq!(count(&t, "Patient?family=残る").await, 1);
    let (s, _, _) = call(&t, "GET", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(s, StatusCode::GONE);
    // Nothing matches: still 204.
    let (s, _, _) = call(&t, "DELETE", "/fhir/Patient?family=nobody", None, &[]).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Unknown criteria are refused, not ignored (which would delete everything).
    let (s, _, _) = call(&t, "DELETE", "/fhir/Patient?nonsense=1", None, &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(count(&t, "Patient?family=残る").await, 1);
}

#[tokio::test]
async fn json_patch() {
    let t = setup(None).await;
    let id = create(&t, &patient("P:1:1:00", "佐藤")).await;
    let url = format!("/fhir/Patient/{id}");
    let ops = json!([{"op": "replace", "path": "/gender", "value": "male"}, {"op": "add", "path": "/name/0/given/-", "value": "次郎"}]);
    let (s, p, h) = call(
        &t,
        "PATCH",
        &url,
        Some(("application/json-patch+json", ops.to_string())),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(
        (p["gender"].as_str(), p["name"][0]["given"][1].as_str()),
        (Some("male"), Some("次郎"))
    );
    assert_eq!(h.get("etag").and_then(|v| v.to_str().ok()), Some("W/\"2\""));
    // A stale If-Match loses nothing.
    let (s, _, _) = call(
        &t,
        "PATCH",
        &url,
        Some(("application/json-patch+json", ops.to_string())),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    // A failing test op, a patch that breaks validation, one that changes the id: 422, no new version.
    for bad in [
        json!([{"op": "test", "path": "/gender", "value": "female"}]),
        json!([{"op": "replace", "path": "/gender", "value": "nonsense"}]),
        json!([{"op": "replace", "path": "/id", "value": "other"}]),
    ] {
        let (s, oo, _) = call(
            &t,
            "PATCH",
            &url,
            Some(("application/json-patch+json", bad.to_string())),
            &[],
        )
        .await;
        assert_eq!(
            (s, oo["resourceType"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("OperationOutcome")),
            "{bad}"
        );
    }
    let (s, _, _) = call(
        &t,
        "PATCH",
        &url,
        Some(("application/fhir+json", "{}".into())),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (s, _, _) = call(
        &t,
        "PATCH",
        &url,
        Some(("application/json-patch+json", "{not json".into())),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, cur, _) = call(&t, "GET", &url, None, &[]).await;
    assert_eq!(cur["meta"]["versionId"], "2");
    // Conditional patch.
    let (s, p, _) = call(
        &t,
        "PATCH",
        &format!("/fhir/Patient?identifier={MEMBER}|P:1:1:00"),
        Some((
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/birthDate", "value": "1961-01-01"}]).to_string(),
        )),
        &[],
    )
    .await;
    assert_eq!(
        (s, p["birthDate"].as_str()),
        (StatusCode::OK, Some("1961-01-01"))
    );
}

#[tokio::test]
async fn everything_returns_the_compartment_and_what_it_refers_to() {
    let t = setup(None).await;
    let pr = create(
        &t,
        &json!({"resourceType": "Practitioner", "name": [{"family": "医師"}]}),
    )
    .await;
    let me = create(&t, &patient("E:1:1:00", "本人")).await;
    let other = create(&t, &patient("E:1:2:00", "他人")).await;
    for (who, n) in [(&me, 5), (&other, 3)] {
        for i in 0..n {
            create(&t, &json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("obs{i}")},
                "subject": {"reference": format!("Patient/{who}")}, "performer": [{"reference": format!("Practitioner/{pr}")}]})).await;
        }
        create(&t, &json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{who}")},
            "code": {"text": "x"}, "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]}})).await;
    }
    let (s, b, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{me}/$everything"),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["total"], 7, "patient + 5 observations + 1 condition");
    let entries = b["entry"].as_array().cloned().unwrap_or_default();
    let matches: Vec<&Value> = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .collect();
    assert_eq!(matches.len(), 7);
    assert!(matches.iter().all(|e| e["resource"]["id"] == me.as_str()
        || e["resource"]["subject"]["reference"] == format!("Patient/{me}")));
    assert!(
        entries
            .iter()
            .any(|e| e["search"]["mode"] == "include" && e["resource"]["id"] == pr.as_str()),
        "the practitioner comes along"
    );
    // Paging, _type.
    let (_, p1, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{me}/$everything?_count=3"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        p1["entry"]
            .as_array()
            .map(|e| e.iter().filter(|x| x["search"]["mode"] == "match").count()),
        Some(3)
    );
    assert!(p1["link"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|l| l["relation"] == "next"));
    let (_, ty, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{me}/$everything?_type=Condition"),
        None,
        &[],
    )
    .await;
    assert_eq!(ty["total"], 1);
    let (s, _, _) = call(&t, "GET", "/fhir/Patient/nobody/$everything", None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = call(
        &t,
        "GET",
        &format!("/fhir/Patient/{me}/$everything?_since=yesterday"),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn transactions_resolve_conditions_and_references() {
    let t = setup(None).await;
    let existing = create(&t, &patient("T:1:1:00", "既存")).await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        // A conditional create that matches: nothing new, its fullUrl means the existing patient.
        {"fullUrl": "urn:uuid:p1", "resource": patient("T:1:1:00", "重複"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier={MEMBER}|T:1:1:00")}},
        {"fullUrl": "urn:uuid:o1", "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "a"}, "subject": {"reference": "urn:uuid:p1"}},
         "request": {"method": "POST", "url": "Observation"}},
        // A conditional reference.
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "b"}, "subject": {"reference": format!("Patient?identifier={MEMBER}|T:1:1:00")}},
         "request": {"method": "POST", "url": "Observation"}},
        // A conditional update creating a new patient.
        {"fullUrl": "urn:uuid:p2", "resource": patient("T:2:2:00", "新規"), "request": {"method": "PUT", "url": format!("Patient?identifier={MEMBER}|T:2:2:00")}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "c"}, "subject": {"reference": "urn:uuid:p2"}},
         "request": {"method": "POST", "url": "Observation"}},
        // Reads run after the writes and see them.
        {"request": {"method": "GET", "url": "Observation?code:text=a,b,c"}}
    ]});
    let (s, r, _) = call(&t, "POST", "/fhir", json_body(&tx), &[]).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let e = r["entry"].as_array().cloned().unwrap_or_default();
    assert_eq!(e.len(), 6);
    assert_eq!(e[0]["response"]["status"], "200 OK");
    assert!(e[0]["response"]["location"]
        .as_str()
        .unwrap_or("")
        .starts_with(&format!("Patient/{existing}/")));
    assert_eq!(e[3]["response"]["status"], "201 Created");
    assert_eq!(e[5]["resource"]["total"], 3, "{}", e[5]);
    assert_eq!(
        count(&t, &format!("Observation?subject=Patient/{existing}")).await,
        2
    );
    assert_eq!(count(&t, "Patient?family=重複").await, 0);
    let new_p = e[3]["response"]["location"]
        .as_str()
        .unwrap_or("")
        .split('/')
        .nth(1)
        .unwrap_or("")
        .to_string();
    assert_eq!(
        count(&t, &format!("Observation?subject=Patient/{new_p}")).await,
        1
    );

    // A conditional reference that matches nothing fails the whole transaction; nothing stored.
    let before = count(&t, "Observation?status=final").await;
    let bad = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "d"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "e"}, "subject": {"reference": format!("Patient?identifier={MEMBER}|none")}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (s, oo, _) = call(&t, "POST", "/fhir", json_body(&bad), &[]).await;
    assert_eq!(
        (s, oo["issue"][0]["expression"][0].as_str()),
        (StatusCode::PRECONDITION_FAILED, Some("Bundle.entry[1]"))
    );
    assert_eq!(count(&t, "Observation?status=final").await, before);
    // Two entries changing one resource are refused.
    let dup = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "same"}, "request": {"method": "PUT", "url": "Patient/same"}},
        {"request": {"method": "DELETE", "url": "Patient/same"}}
    ]});
    let (s, _, _) = call(&t, "POST", "/fhir", json_body(&dup), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // PATCH as a Binary inside a transaction, with return=representation.
    let patch = base64::engine::general_purpose::STANDARD
        .encode(json!([{"op": "replace", "path": "/gender", "value": "other"}]).to_string());
    let ptx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": patch}, "request": {"method": "PATCH", "url": format!("Patient/{existing}")}}
    ]});
    let (s, r, _) = call(
        &t,
        "POST",
        "/fhir",
        json_body(&ptx),
        &[("prefer", "return=representation")],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["entry"][0]["resource"]["gender"], "other");
}

/// Each malformed part of a transaction entry is refused with 400 naming its element, and
/// nothing of the transaction is stored; `ifMatch` on an entry holds a current version and
/// refuses a stale one.
#[tokio::test]
async fn malformed_transaction_entries_name_their_element_and_store_nothing() {
    let t = setup(None).await;
    let id = create(&t, &patient("M:1:1:00", "版")).await;
    let good = json!({"resource": patient("M:2:2:00", "良"), "request": {"method": "POST", "url": "Patient"}});
    let cases = [
        (
            json!({"resource": patient("M:3:3:00", "無"), "request": {"url": "Patient"}}),
            "Bundle.entry[1].request.method",
        ),
        (
            json!({"resource": patient("M:3:3:00", "誤"), "request": {"method": "FETCH", "url": "Patient"}}),
            "Bundle.entry[1].request.method",
        ),
        (
            json!({"resource": patient("M:3:3:00", "無"), "request": {"method": "POST"}}),
            "Bundle.entry[1].request.url",
        ),
        (
            json!({"request": {"method": "POST", "url": "Patient"}}),
            "Bundle.entry[1].resource",
        ),
        (
            json!({"resource": patient("M:1:1:00", "版"), "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"x\""}}),
            "Bundle.entry[1].request.ifMatch",
        ),
    ];
    for (bad, path) in cases {
        let tx =
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [good.clone(), bad]});
        let (s, oo, _) = call(&t, "POST", "/fhir", json_body(&tx), &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["expression"][0], path, "{oo}");
        assert_eq!(
            count(&t, &format!("Patient?identifier={MEMBER}|M:2:2:00")).await,
            0,
            "{path}"
        );
    }
    let update = |if_match: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "id": id, "gender": "male"},
             "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": if_match}}]})
    };
    let (s, r, _) = call(&t, "POST", "/fhir", json_body(&update("W/\"1\"")), &[]).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(r["entry"][0]["response"]["etag"], "W/\"2\"");
    let (s, oo, _) = call(&t, "POST", "/fhir", json_body(&update("W/\"1\"")), &[]).await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{oo}");
    let (_, cur, _) = call(&t, "GET", &format!("/fhir/Patient/{id}"), None, &[]).await;
    assert_eq!(cur["meta"]["versionId"], "2");
}

/// A body that is not UTF-8 (here Shift_JIS bytes in a name, as an older system might send) is
/// refused with 400 and an OperationOutcome by every interaction that takes a resource, JSON or
/// XML, and nothing is stored; the same resource in UTF-8 is then accepted.
#[tokio::test]
async fn a_body_that_is_not_utf8_is_refused_and_nothing_stored() {
    let t = setup(None).await;
    let utf8 = patient("U:1:1:00", "SJIS").to_string();
    // 山田 in Shift_JIS.
    let sjis = |text: &str| {
        let (before, after) = text.split_once("SJIS").unwrap_or((text, ""));
        [
            before.as_bytes(),
            &[0x8e, 0x52, 0x93, 0x63],
            after.as_bytes(),
        ]
        .concat()
    };
    let tx = format!(
        r#"{{"resourceType":"Bundle","type":"transaction","entry":[{{"resource":{utf8},"request":{{"method":"POST","url":"Patient"}}}}]}}"#
    );
    let xml =
        r#"<Patient xmlns="http://hl7.org/fhir"><name><family value="SJIS"/></name></Patient>"#;
    let cases = [
        (
            "POST",
            "/fhir/Patient",
            "application/fhir+json",
            sjis(&utf8),
        ),
        (
            "PUT",
            "/fhir/Patient/u1",
            "application/fhir+json",
            sjis(&utf8),
        ),
        ("POST", "/fhir", "application/fhir+json", sjis(&tx)),
        ("POST", "/fhir/Patient", "application/fhir+xml", sjis(xml)),
    ];
    for (method, uri, ct, body) in cases {
        let (s, _, answer) = raw(&t, method, uri, Some((ct, body)), &[]).await;
        let oo: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} {ct}: {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{method} {uri}");
        assert!(oo.to_string().contains("UTF-8"), "{method} {uri}: {oo}");
    }
    assert_eq!(count(&t, "Patient?_lastUpdated=gt2000-01-01").await, 0);
    let (s, _, _) = raw(
        &t,
        "POST",
        "/fhir/Patient",
        Some(("application/fhir+json", utf8.into_bytes())),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(count(&t, "Patient?family=SJIS").await, 1);
}

#[tokio::test]
async fn batch_entries_succeed_and_fail_on_their_own() {
    let t = setup(None).await;
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("B:1:1:00", "一"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "nonsense"}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"request": {"method": "DELETE", "url": "Patient?family=誰も"}},
        {"request": {"method": "GET", "url": "Patient?family=一"}}
    ]});
    let (s, r, _) = call(&t, "POST", "/fhir", json_body(&b), &[]).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let st: Vec<String> = r["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        st,
        vec![
            "201 Created",
            "422 Unprocessable Entity",
            "404 Not Found",
            "204 No Content",
            "200 OK"
        ]
    );
    assert_eq!(
        r["entry"][1]["response"]["outcome"]["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.gender"
    );
    assert_eq!(r["entry"][4]["resource"]["total"], 1);
}

#[tokio::test]
async fn xml_gzip_and_conditional_read() {
    let t = setup(None).await;
    let id = create(&t, &patient("X:1:1:00", "佐藤")).await;
    let url = format!("/fhir/Patient/{id}");
    for (uri, hdr) in [
        (format!("{url}?_format=xml"), None),
        (url.clone(), Some(("accept", "application/fhir+xml"))),
    ] {
        let h: Vec<(&str, &str)> = hdr.into_iter().collect();
        let (s, headers, body) = raw(&t, "GET", &uri, None, &h).await;
        let text = String::from_utf8_lossy(&body).to_string();
        assert_eq!(s, StatusCode::OK);
        assert!(headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .starts_with("application/fhir+xml"));
        assert!(
            text.contains("<Patient xmlns=\"http://hl7.org/fhir\">")
                && text.contains("<family value=\"佐藤\"/>"),
            "{text}"
        );
    }
    // A searchset in XML carries its resources.
    let (_, _, body) = raw(&t, "GET", "/fhir/Patient?_format=xml", None, &[]).await;
    assert!(String::from_utf8_lossy(&body).contains("<resource><Patient"));
    let (s, oo, _) = call(&t, "GET", &format!("{url}?_format=text/turtle"), None, &[]).await;
    assert_eq!(
        (s, oo["resourceType"].as_str()),
        (StatusCode::NOT_ACCEPTABLE, Some("OperationOutcome"))
    );
    let (_, _, body) = raw(&t, "GET", &format!("{url}?_pretty=true"), None, &[]).await;
    assert!(String::from_utf8_lossy(&body).contains("\n  \"resourceType\""));
    // gzip both ways.
    let (s, h, body) = raw(
        &t,
        "GET",
        "/fhir/Patient",
        None,
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        h.get("content-encoding").and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut text)
        .unwrap_or_default();
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap_or_default()["total"],
        1
    );
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(patient("X:1:2:00", "圧縮").to_string().as_bytes())
        .unwrap_or_default();
    let zipped = enc.finish().unwrap_or_default();
    let (s, _, _) = raw(
        &t,
        "POST",
        "/fhir/Patient",
        Some(("application/fhir+json", zipped)),
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(count(&t, "Patient?family=圧縮").await, 1);
    // If-None-Match with the current version: 304, no body.
    let (s, _, body) = raw(&t, "GET", &url, None, &[("if-none-match", "W/\"1\"")]).await;
    assert_eq!((s, body.len()), (StatusCode::NOT_MODIFIED, 0));
}

#[tokio::test]
async fn capability_statement_declares_what_is_implemented() {
    let t = setup(None).await;
    let (_, cs, _) = call(&t, "GET", "/fhir/metadata", None, &[]).await;
    let res = cs["rest"][0]["resource"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let patient = res
        .iter()
        .find(|r| r["type"] == "Patient")
        .cloned()
        .unwrap_or_default();
    assert_eq!(patient["conditionalUpdate"], true);
    assert_eq!(patient["conditionalDelete"], "multiple");
    assert!(patient["interaction"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["code"] == "patch"));
    let ops: Vec<&str> = patient["operation"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(ops, vec!["everything", "export"]);
    assert!(patient["searchRevInclude"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r == "Observation:subject"));
    assert_eq!(cs["patchFormat"][0], "application/json-patch+json");
    let obs = res
        .iter()
        .find(|r| r["type"] == "Observation")
        .cloned()
        .unwrap_or_default();
    assert!(obs["searchParam"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["name"] == "code-value-quantity" && p["type"] == "composite"));
    assert!(obs["searchParam"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["name"] == "value-quantity" && p["type"] == "quantity"));
}
