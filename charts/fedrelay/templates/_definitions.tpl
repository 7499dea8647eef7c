{{/* Names */}}
{{- define "fedrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedrelay.headless" -}}
{{- printf "%s-headless" (include "fedrelay.fullname" .) }}
{{- end }}

{{- define "fedrelay.admin" -}}
{{- printf "%s-admin" (include "fedrelay.fullname" .) }}
{{- end }}

{{- define "fedrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels */}}
{{- define "fedrelay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "fedrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedrelay
{{- end }}

{{/* The relay pods; etcd, redis and loadtest pods have their own component. */}}
{{- define "fedrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "fedrelay.componentSelector" -}}
app.kubernetes.io/name: {{ include "fedrelay.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fedrelay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether the nodes form a cluster (etcd membership, gRPC between nodes): "true" or "". */}}
{{- define "fedrelay.clustered" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.autoscaling.enabled .Values.cluster.enabled }}true{{ end }}
{{- end }}

{{/* The store backend: store.backend, or redis when a Redis is configured, else memory. */}}
{{- define "fedrelay.storeBackend" -}}
{{- if .Values.store.backend }}{{ .Values.store.backend }}
{{- else if or .Values.redis.enabled .Values.externalRedis.url }}redis
{{- else }}memory
{{- end }}
{{- end }}

{{/* Redis URL without credentials (it goes into the ConfigMap). */}}
{{- define "fedrelay.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379" (include "fedrelay.fullname" .) }}
{{- else }}
{{- .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* The Redis URL with $(REDIS_PASSWORD), expanded by the kubelet from the Secret. */}}
{{- define "fedrelay.redisUrlWithPassword" -}}
{{- $url := include "fedrelay.redisUrl" . }}
{{- $scheme := regexFind "^[a-z]+://" $url }}
{{- printf "%s%s:$(REDIS_PASSWORD)@%s" $scheme .Values.externalRedis.username (trimPrefix $scheme $url) }}
{{- end }}

{{- define "fedrelay.redisPassword" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.url .Values.externalRedis.password.existingSecret }}true{{ end }}
{{- end }}

{{/*
TLS to the external Redis with material from externalRedis.tls.existingSecret, mounted at
fedrelay.redisTlsDir: "true" or "". Without the Secret, a rediss:// URL uses the system's roots.
*/}}
{{- define "fedrelay.redisTls" -}}
{{- $r := .Values.externalRedis }}
{{- if and (eq (include "fedrelay.storeBackend" .) "redis") (not .Values.redis.enabled) (hasPrefix "rediss://" $r.url) $r.tls.existingSecret }}true{{ end }}
{{- end }}

{{- define "fedrelay.redisTlsDir" -}}/etc/fedrelay/redis-tls{{- end }}

{{/* TLS to the external etcd (https:// endpoints) with externalEtcd.tls.existingSecret: "true" or "". */}}
{{- define "fedrelay.etcdTls" -}}
{{- $e := .Values.externalEtcd }}
{{- if and (include "fedrelay.clustered" .) (not .Values.etcd.enabled) (gt (len $e.endpoints) 0) $e.tls.existingSecret }}true{{ end }}
{{- end }}

{{- define "fedrelay.etcdTlsDir" -}}/etc/fedrelay/etcd-tls{{- end }}

{{/* The items of a backend's TLS Secret (externalRedis.tls / externalEtcd.tls), as YAML. */}}
{{- define "fedrelay.backendTlsItems" -}}
{{- if .caKey }}
- key: {{ .caKey | quote }}
  path: ca.crt
{{- end }}
{{- if .clientCert }}
- key: {{ .certKey | quote }}
  path: tls.crt
- key: {{ .keyKey | quote }}
  path: tls.key
{{- end }}
{{- end }}

{{/* etcd client endpoints as a list (JSON). */}}
{{- define "fedrelay.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- list (printf "http://%s-etcd:2379" (include "fedrelay.fullname" .)) | toJson }}
{{- else }}
{{- .Values.externalEtcd.endpoints | toJson }}
{{- end }}
{{- end }}

{{/* The port of a URL (scheme://host:port/...), or the default given. */}}
{{- define "fedrelay.urlPort" -}}
{{- $hostport := regexReplaceAll "^[a-z]+://([^/]*).*$" .url "${1}" }}
{{- $port := regexFind ":[0-9]+$" $hostport | trimPrefix ":" }}
{{- default .default $port }}
{{- end }}

{{/* Where secrets are mounted in the pods. */}}
{{- define "fedrelay.secretsDir" -}}/etc/fedrelay/secrets{{- end }}

{{/* The Secret and key holding a domain's HMAC secret: "name/key", or "" when none. */}}
{{- define "fedrelay.domainSecretRef" -}}
{{- $d := .domain }}
{{- $v := .root.Values }}
{{- if and $d.secret $d.secret.existingSecret }}
{{- printf "%s/%s" $d.secret.existingSecret (default $d.name $d.secret.key) }}
{{- else if and $v.trialSecrets.enabled (hasKey $v.trialSecrets.domains $d.name) }}
{{- printf "%s-trial/domain.%s" (include "fedrelay.fullname" .root) $d.name }}
{{- end }}
{{- end }}

{{- define "fedrelay.teamsSecretRef" -}}
{{- $t := .Values.teams }}
{{- if $t.appPassword.existingSecret }}
{{- printf "%s/%s" $t.appPassword.existingSecret (default "app-password" $t.appPassword.key) }}
{{- else if and .Values.trialSecrets.enabled .Values.trialSecrets.teamsAppPassword }}
{{- printf "%s-trial/teams-app-password" (include "fedrelay.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The projected volume's sources for the mounted secrets: every HTTP domain's HMAC secret at
domains/<name>, the bot's password at teams/app-password; items grouped by Secret.
*/}}
{{- define "fedrelay.secretSources" -}}
{{- $bySecret := dict }}
{{- $order := list }}
{{- range .Values.domains }}
{{- if eq .platform "http" }}
{{- $ref := include "fedrelay.domainSecretRef" (dict "domain" . "root" $) }}
{{- if $ref }}
{{- $name := regexReplaceAll "/.*$" $ref "" }}
{{- $key := regexReplaceAll "^[^/]*/" $ref "" }}
{{- if not (hasKey $bySecret $name) }}{{ $order = append $order $name }}{{ $_ := set $bySecret $name list }}{{ end }}
{{- $_ := set $bySecret $name (append (get $bySecret $name) (dict "key" $key "path" (printf "domains/%s" .name))) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.teams.enabled }}
{{- $ref := include "fedrelay.teamsSecretRef" . }}
{{- if $ref }}
{{- $name := regexReplaceAll "/.*$" $ref "" }}
{{- $key := regexReplaceAll "^[^/]*/" $ref "" }}
{{- if not (hasKey $bySecret $name) }}{{ $order = append $order $name }}{{ $_ := set $bySecret $name list }}{{ end }}
{{- $_ := set $bySecret $name (append (get $bySecret $name) (dict "key" $key "path" "teams/app-password")) }}
{{- end }}
{{- end }}
{{- $sources := list }}
{{- range $order }}
{{- $sources = append $sources (dict "secret" (dict "name" . "items" (get $bySecret .))) }}
{{- end }}
{{- $sources | toJson }}
{{- end }}

{{/* Grace period: preStop + drain + margin, or the user's value when it covers preStop + drain. */}}
{{- define "fedrelay.preStopSeconds" -}}
{{- if eq .Values.preStop.mode "none" }}0{{ else }}{{ int .Values.preStop.seconds }}{{ end }}
{{- end }}

{{- define "fedrelay.terminationGracePeriod" -}}
{{- $need := add (int (include "fedrelay.preStopSeconds" .)) (int .Values.shutdown.drainTimeoutSecs) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $need (int .Values.terminationGraceMarginSeconds) }}
{{- else if lt (int .Values.terminationGracePeriodSeconds) (int $need) }}
{{- fail (printf "terminationGracePeriodSeconds=%d does not cover preStop.seconds (%s) + shutdown.drainTimeoutSecs (%d) = %d: pods would be killed while draining. Raise it (with a margin of ~10 s), or leave it empty to have it computed." (int .Values.terminationGracePeriodSeconds) (include "fedrelay.preStopSeconds" .) (int .Values.shutdown.drainTimeoutSecs) (int $need)) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The pod security context and the container security context every pod of the chart gets. */}}
{{- define "fedrelay.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .runAsUser }}
runAsGroup: {{ int .runAsGroup }}
fsGroup: {{ int .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "fedrelay.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Checks of values that the schema cannot express. Rendering fails with a message naming the
values to change.
*/}}
{{- define "fedrelay.validate" -}}
{{- $v := .Values }}
{{- $clustered := include "fedrelay.clustered" . }}
{{- $backend := include "fedrelay.storeBackend" . }}
{{- $hasEtcd := or $v.etcd.enabled (gt (len $v.externalEtcd.endpoints) 0) }}
{{- $hasRedis := or $v.redis.enabled $v.externalRedis.url }}
{{- if and $v.etcd.enabled (gt (len $v.externalEtcd.endpoints) 0) }}
{{- fail "give etcd.enabled=true (in-chart etcd) or externalEtcd.endpoints, not both" }}
{{- end }}
{{- if and $v.redis.enabled $v.externalRedis.url }}
{{- fail "give redis.enabled=true (in-chart Redis) or externalRedis.url, not both" }}
{{- end }}
{{- if and $clustered (not (and $hasEtcd $hasRedis)) }}
{{- $why := ternary (printf "replicas=%d" (int $v.replicas)) (ternary "autoscaling.enabled=true" "cluster.enabled=true" $v.autoscaling.enabled) (gt (int $v.replicas) 1) }}
{{- fail (printf "%s makes a cluster, and a cluster needs etcd (membership) and Redis (shared sessions), but %s configured: set etcd.enabled=true and redis.enabled=true (small in-chart ones, for trials) or externalEtcd.endpoints and externalRedis.url. A single node (replicas=1) can run without either, with store.backend=memory." $why (ternary "neither is" (ternary "no Redis is" "no etcd is" $hasEtcd) (and (not $hasEtcd) (not $hasRedis)))) }}
{{- end }}
{{- if and $clustered (eq $backend "memory") }}
{{- fail "a cluster shares its sessions in Redis: store.backend must be redis (or empty)" }}
{{- end }}
{{- if and (eq $backend "redis") (not $hasRedis) }}
{{- fail "store.backend=redis needs a Redis: redis.enabled=true (in-chart, for trials) or externalRedis.url" }}
{{- end }}
{{- if and $clustered (not $v.cluster.tls.existingSecret) (not $v.cluster.allowPlaintext) }}
{{- fail "gRPC between the nodes needs mTLS (cluster.tls.existingSecret: a Secret with tls.crt, tls.key, ca.crt) or cluster.allowPlaintext=true on a network only the relay pods reach (networkPolicy.enabled=true)" }}
{{- end }}
{{- if and (not $v.http.tls.existingSecret) (not $v.http.allowPlaintext) }}
{{- fail "the HTTP edge needs http.tls.existingSecret (a kubernetes.io/tls Secret), or http.allowPlaintext=true behind a TLS-terminating Ingress" }}
{{- end }}
{{- if and (contains "@" $v.externalRedis.url) }}
{{- fail "externalRedis.url must not hold credentials (it goes into a ConfigMap): give the password in externalRedis.password.existingSecret" }}
{{- end }}
{{- $rt := $v.externalRedis.tls }}
{{- if and $rt.existingSecret (not (hasPrefix "rediss://" $v.externalRedis.url)) }}
{{- fail (printf "externalRedis.tls.existingSecret=%s is for TLS to an external Redis, but externalRedis.url is %q, not a rediss:// URL: use rediss://host:port, or leave externalRedis.tls.existingSecret empty (the relay refuses TLS settings without rediss://)" $rt.existingSecret $v.externalRedis.url) }}
{{- end }}
{{- if and $rt.clientCert (not $rt.existingSecret) }}
{{- fail "externalRedis.tls.clientCert=true needs externalRedis.tls.existingSecret: a Secret holding the client certificate and key (keys externalRedis.tls.certKey and externalRedis.tls.keyKey)" }}
{{- end }}
{{- if and $rt.existingSecret (not $rt.caKey) (not $rt.clientCert) }}
{{- fail "externalRedis.tls.existingSecret is set but nothing is read from it: give externalRedis.tls.caKey (the CA that signed Redis's certificate) and/or externalRedis.tls.clientCert=true, or leave existingSecret empty to trust the system's roots" }}
{{- end }}
{{- $et := $v.externalEtcd.tls }}
{{- $https := 0 }}
{{- range $v.externalEtcd.endpoints }}{{ if hasPrefix "https://" . }}{{ $https = add1 $https }}{{ end }}{{ end }}
{{- if and (gt $https 0) (lt $https (len $v.externalEtcd.endpoints)) }}
{{- fail (printf "externalEtcd.endpoints mix http:// and https:// (%s): give all http:// or all https://" (join ", " $v.externalEtcd.endpoints)) }}
{{- end }}
{{- if and (gt $https 0) (not $et.existingSecret) }}
{{- fail "externalEtcd.endpoints are https://: set externalEtcd.tls.existingSecret to a Secret holding the CA that signed etcd's certificate (key externalEtcd.tls.caKey, default ca.crt) and, with externalEtcd.tls.clientCert=true, this relay's client certificate and key" }}
{{- end }}
{{- if and $et.existingSecret (eq $https 0) }}
{{- fail (printf "externalEtcd.tls.existingSecret=%s is for TLS to an external etcd, but externalEtcd.endpoints are not https:// (%s): use https:// endpoints, or leave externalEtcd.tls.existingSecret empty (the relay refuses TLS settings without https://)" $et.existingSecret (join ", " $v.externalEtcd.endpoints)) }}
{{- end }}
{{- if and $et.clientCert (not $et.existingSecret) }}
{{- fail "externalEtcd.tls.clientCert=true needs externalEtcd.tls.existingSecret: a Secret holding the CA, the client certificate and key" }}
{{- end }}
{{- $names := dict }}
{{- range $v.domains }}
{{- if hasKey $names (lower .name) }}
{{- fail (printf "domains: %s is declared twice" .name) }}
{{- end }}
{{- $_ := set $names (lower .name) true }}
{{- if eq .platform "http" }}
{{- if not (include "fedrelay.domainSecretRef" (dict "domain" . "root" $)) }}
{{- fail (printf "domains: %s needs secret.existingSecret (a Secret you create holding its HMAC secret; see docs/operations.md), or for trials trialSecrets.enabled=true with trialSecrets.domains.%s" .name .name) }}
{{- end }}
{{- if and (eq (default "stream" .delivery) "webhook") (not .webhookUrl) }}
{{- fail (printf "domains: %s has delivery webhook but no webhookUrl" .name) }}
{{- end }}
{{- else if eq .platform "teams" }}
{{- if not $v.teams.enabled }}
{{- fail (printf "domains: %s is a Teams domain: set teams.enabled=true with the bot's appId, appTenantId and appPassword" .name) }}
{{- end }}
{{- else if eq .platform "xmpp" }}
{{- if not $v.xmpp.enabled }}
{{- fail (printf "domains: %s has platform xmpp, but the XMPP edge is off: set xmpp.enabled=true with xmpp.tls.secretName (the relay's certificate; see docs/operations.md), or remove the domain (the relay refuses XMPP domains without its [xmpp] section)" .name) }}
{{- end }}
{{- else if eq .platform "sip" }}
{{- if not $v.sip.enabled }}
{{- fail (printf "domains: %s has platform sip, but the SIP edge is off: set sip.enabled=true with sip.host and sip.tls.secretName (the relay's certificate; see docs/sip.md), or remove the domain (the relay refuses SIP domains without its [sip] section)" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- include "fedrelay.validateXmpp" (dict "root" $ "names" $names) }}
{{- include "fedrelay.validateSip" (dict "root" $ "names" $names) }}
{{- include "fedrelay.validateApi" . }}
{{- range $v.federation }}
{{- range .between }}
{{- if not (hasKey $names (lower .)) }}
{{- fail (printf "federation: %s is not one of the domains" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.teams.enabled (not (include "fedrelay.teamsSecretRef" .)) }}
{{- fail "teams.enabled needs the bot's password: teams.appPassword.existingSecret, or for trials trialSecrets.enabled=true with trialSecrets.teamsAppPassword" }}
{{- end }}
{{- if and $v.teams.enabled (or (not $v.teams.appId) (not $v.teams.appTenantId)) }}
{{- fail "teams.enabled needs teams.appId and teams.appTenantId" }}
{{- end }}
{{- if $v.loadtest.enabled }}
{{- $http := 0 }}
{{- range $v.domains }}{{ if eq .platform "http" }}{{ $http = add1 $http }}{{ end }}{{ end }}
{{- if lt $http 2 }}
{{- fail "loadtest.enabled: the harness plays the config's HTTP domains; declare at least two (federated with each other, delivery stream)" }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is larger than autoscaling.maxReplicas" }}
{{- end }}
{{- $_ := include "fedrelay.terminationGracePeriod" . }}
{{- end }}

{{/* Checks of the XMPP edge's values; .names: the declared domains (lower case). */}}
{{- define "fedrelay.validateXmpp" -}}
{{- $v := .root.Values }}
{{- $x := $v.xmpp }}
{{- if hasKey $x.service "enabled" }}
{{- fail "xmpp.service.enabled is gone: the XMPP Service is rendered with the edge, xmpp.enabled=true (xmpp.service keeps its type, port, annotations and loadBalancerSourceRanges)" }}
{{- end }}
{{- if $x.enabled }}
{{- if not $x.tls.secretName }}
{{- fail "xmpp.enabled needs xmpp.tls.secretName: a kubernetes.io/tls Secret (tls.crt, tls.key) whose certificate's DNS SANs name every domain XMPP peers reach here" }}
{{- end }}
{{- if and (include "fedrelay.clustered" .root) (not $x.dialbackSecret.secretName) }}
{{- $why := ternary (printf "replicas=%d" (int $v.replicas)) (ternary "autoscaling.enabled=true" "cluster.enabled=true" $v.autoscaling.enabled) (gt (int $v.replicas) 1) }}
{{- fail (printf "xmpp.enabled with %s needs xmpp.dialbackSecret.secretName: every node must share the dialback secret, since a peer's dialback verification may reach any node. Create a Secret with at least 32 random bytes (kubectl create secret generic fedrelay-xmpp-dialback --from-literal=%s=\"$(openssl rand -hex 32)\") and name it there" $why $x.dialbackSecret.key) }}
{{- end }}
{{- $xmppDomains := dict }}
{{- range $v.domains }}{{ if eq .platform "xmpp" }}{{ $_ := set $xmppDomains (lower .name) true }}{{ end }}{{ end }}
{{- $peers := dict }}
{{- range $x.peers }}
{{- if not (hasKey $xmppDomains (lower .domain)) }}
{{- fail (printf "xmpp.peers: %s is not one of the domains with platform xmpp: declare it in domains (platform: xmpp) or remove the peer" .domain) }}
{{- end }}
{{- if hasKey $peers (lower .domain) }}
{{- fail (printf "xmpp.peers: %s is listed twice" .domain) }}
{{- end }}
{{- $_ := set $peers (lower .domain) true }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedrelay.xmppDir" -}}/etc/fedrelay/xmpp{{- end }}

{{/* Checks of the management API's values: where the relay would refuse its [api] section. */}}
{{- define "fedrelay.validateApi" -}}
{{- $v := .Values }}
{{- $a := $v.api }}
{{- if $a.enabled }}
{{- if and (eq $a.exposure "service") (not $a.tls.secretName) (not $a.allowPlaintext) }}
{{- fail "api.exposure=service puts the management API on the pods' address, where the relay refuses it without TLS: set api.tls.secretName (a kubernetes.io/tls Secret), or api.allowPlaintext=true behind a TLS-terminating proxy; or keep api.exposure=loopback and reach it through kubectl port-forward" }}
{{- end }}
{{- $o := $a.oidc }}
{{- if or $o.issuer $o.audience $o.jwksUrl $o.caSecretName }}
{{- if not $o.issuer }}
{{- fail "api.oidc needs api.oidc.issuer: the https:// URL of the OpenID Connect provider (the iss of its tokens); or leave api.oidc.audience, jwksUrl and caSecretName empty for no OIDC" }}
{{- end }}
{{- if not $o.audience }}
{{- fail (printf "api.oidc.issuer=%s needs api.oidc.audience: the aud the API's access tokens carry (the relay refuses OIDC without it)" $o.issuer) }}
{{- end }}
{{- if not (hasPrefix "https://" $o.issuer) }}
{{- fail (printf "api.oidc.issuer=%s is not an https:// URL: the relay fetches the provider's signing keys from it and refuses anything else" $o.issuer) }}
{{- end }}
{{- if and $o.jwksUrl (not (hasPrefix "https://" $o.jwksUrl)) }}
{{- fail (printf "api.oidc.jwksUrl=%s is not an https:// URL: the relay refuses signing keys fetched otherwise" $o.jwksUrl) }}
{{- end }}
{{- end }}
{{- $p := $o.portal }}
{{- if or $p.clientId $p.redirectUrl $p.clientSecret.secretName }}
{{- if not $o.issuer }}
{{- fail "api.oidc.portal signs people in at the OpenID Connect provider: it needs api.oidc.issuer and api.oidc.audience" }}
{{- end }}
{{- if not $p.clientId }}
{{- fail "api.oidc.portal needs clientId: the portal's client at the provider" }}
{{- end }}
{{- $local := or (hasPrefix "http://localhost:" $p.redirectUrl) (hasPrefix "http://127.0.0.1:" $p.redirectUrl) }}
{{- if not (and (or (hasPrefix "https://" $p.redirectUrl) $local) (hasSuffix "/portal/callback" $p.redirectUrl)) }}
{{- fail (printf "api.oidc.portal.redirectUrl=%q must be https://<the portal's host>/portal/callback (or http://localhost:<port>/portal/callback through kubectl port-forward), as registered at the provider" $p.redirectUrl) }}
{{- end }}
{{- end }}
{{- $ports := dict "http.port" $v.http.port "admin.port" $v.admin.port }}
{{- if include "fedrelay.clustered" . }}{{ $_ := set $ports "cluster.grpcPort" $v.cluster.grpcPort }}{{ end }}
{{- if $v.xmpp.enabled }}{{ $_ := set $ports "xmpp.port" $v.xmpp.port }}{{ end }}
{{- if $v.sip.enabled }}
{{- range $t := list "tcp" "tls" }}{{ with get $v.sip $t }}{{ if .enabled }}{{ $_ := set $ports (printf "sip.%s.port" $t) .port }}{{ end }}{{ end }}{{ end }}
{{- end }}
{{- range $name, $port := $ports }}
{{- if eq (int $port) (int $a.port) }}
{{- fail (printf "api.port and %s are both %d: the management API needs a port of its own (default 9443)" $name (int $port)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedrelay.apiDir" -}}/etc/fedrelay/api{{- end }}

{{/*
The management API's certificate and key (tls.crt, tls.key), the bootstrap token
(bootstrap-token), the OIDC provider's CA (oidc-ca.crt) and the portal's client secret
(portal-client-secret), in one projected volume of the relay
pods (not the loadtest Job's). Rendered when there is something to mount.
*/}}
{{- define "fedrelay.apiSources" -}}
{{- $a := .Values.api }}
{{- $sources := list }}
{{- if $a.enabled }}
{{- if $a.tls.secretName }}
{{- $sources = append $sources (dict "secret" (dict "name" $a.tls.secretName "items" (list (dict "key" "tls.crt" "path" "tls.crt") (dict "key" "tls.key" "path" "tls.key")))) }}
{{- end }}
{{- if $a.bootstrapToken.secretName }}
{{- $sources = append $sources (dict "secret" (dict "name" $a.bootstrapToken.secretName "items" (list (dict "key" $a.bootstrapToken.key "path" "bootstrap-token")))) }}
{{- end }}
{{- if and $a.oidc.issuer $a.oidc.caSecretName }}
{{- $sources = append $sources (dict "secret" (dict "name" $a.oidc.caSecretName "items" (list (dict "key" $a.oidc.caKey "path" "oidc-ca.crt")))) }}
{{- end }}
{{- if and $a.oidc.issuer $a.oidc.portal.clientId $a.oidc.portal.clientSecret.secretName }}
{{- $sources = append $sources (dict "secret" (dict "name" $a.oidc.portal.clientSecret.secretName "items" (list (dict "key" $a.oidc.portal.clientSecret.key "path" "portal-client-secret")))) }}
{{- end }}
{{- end }}
{{- $sources | toJson }}
{{- end }}

{{- define "fedrelay.apiVolumeMounts" -}}
{{- if ne (include "fedrelay.apiSources" .) "[]" }}
- name: api
  mountPath: {{ include "fedrelay.apiDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "fedrelay.apiVolumes" -}}
{{- $sources := include "fedrelay.apiSources" . }}
{{- if ne $sources "[]" }}
- name: api
  projected:
    defaultMode: 288 # 0440
    sources:
      {{- $sources | fromJsonArray | toYaml | nindent 6 }}
{{- end }}
{{- end }}

{{/* Whether the management API listens on the pods' address (its Service and NetworkPolicy rule): "true" or "". */}}
{{- define "fedrelay.apiExposed" -}}
{{- if and .Values.api.enabled (eq .Values.api.exposure "service") }}true{{ end }}
{{- end }}

{{/*
Outgoing HTTPS: networkPolicy.egress.httpsPorts, and the ports of the OIDC provider's URLs
(api.oidc.issuer, api.oidc.jwksUrl; 443 when they give none), as a JSON list.
*/}}
{{- define "fedrelay.httpsEgressPorts" -}}
{{- $ports := list }}
{{- range .Values.networkPolicy.egress.httpsPorts }}{{ $ports = append $ports (int .) }}{{ end }}
{{- $o := .Values.api.oidc }}
{{- if and .Values.api.enabled $o.issuer }}
{{- range $url := list $o.issuer $o.jwksUrl }}
{{- if $url }}
{{- $p := include "fedrelay.urlPort" (dict "url" $url "default" "443") | int }}
{{- if not (has $p $ports) }}{{ $ports = append $ports $p }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- $ports | toJson }}
{{- end }}

{{/* Checks of the SIP edge's values; .names: the declared domains (lower case). */}}
{{- define "fedrelay.validateSip" -}}
{{- $v := .root.Values }}
{{- $s := $v.sip }}
{{- if hasKey $s.service "enabled" }}
{{- fail "sip.service.enabled is gone: the SIP Service is rendered with the edge, sip.enabled=true, and exposes the ports of the transports turned on (sip.udp.enabled, sip.tcp.enabled, sip.tls.enabled); sip.service keeps its type, externalTrafficPolicy, annotations and loadBalancerSourceRanges" }}
{{- end }}
{{- range $old, $new := dict "udpPort" "sip.udp.port" "tcpPort" "sip.tcp.port" "tlsPort" "sip.tls.port" }}
{{- if hasKey $s.service $old }}
{{- fail (printf "sip.service.%s is gone: the SIP Service exposes %s, the port the edge listens on (Via and Contact headers name it, so the Service does not translate it)" $old $new) }}
{{- end }}
{{- end }}
{{- if $s.enabled }}
{{- if not (or $s.udp.enabled $s.tcp.enabled $s.tls.enabled) }}
{{- fail "sip.enabled needs a transport: turn on sip.tls.enabled (mutual TLS on 5061, as Skype for Business and Lync federate), sip.tcp.enabled or sip.udp.enabled" }}
{{- end }}
{{- if not $s.host }}
{{- fail "sip.enabled needs sip.host: the relay's public name (the target of the hosted domains' SIP SRV records, e.g. sip.contoso.example), written into Via and Contact headers; without it peers would answer to the pod's own address" }}
{{- end }}
{{- if and $s.tls.enabled (not $s.tls.secretName) }}
{{- fail "sip.tls.enabled needs sip.tls.secretName: a kubernetes.io/tls Secret (tls.crt, tls.key) whose certificate's DNS SANs name sip.host and every domain SIP peers reach here; or turn sip.tls.enabled off and use sip.tcp.enabled / sip.udp.enabled" }}
{{- end }}
{{- if and $s.tcp.enabled $s.tls.enabled (eq (int $s.tcp.port) (int $s.tls.port)) }}
{{- fail (printf "sip.tcp.port and sip.tls.port are both %d: TCP and TLS need ports of their own (5060 and 5061)" (int $s.tcp.port)) }}
{{- end }}
{{- $sipDomains := dict }}
{{- range $v.domains }}{{ if eq .platform "sip" }}{{ $_ := set $sipDomains (lower .name) true }}{{ end }}{{ end }}
{{- $peers := dict }}
{{- range $s.peers }}
{{- if not (hasKey $sipDomains (lower .domain)) }}
{{- fail (printf "sip.peers: %s is not one of the domains with platform sip: declare it in domains (platform: sip) or remove the peer" .domain) }}
{{- end }}
{{- if hasKey $peers (lower .domain) }}
{{- fail (printf "sip.peers: %s is listed twice" .domain) }}
{{- end }}
{{- $_ := set $peers (lower .domain) true }}
{{- $transport := default "tls" .transport }}
{{- if not (get $s $transport).enabled }}
{{- fail (printf "sip.peers: %s uses transport %s, but sip.%s.enabled is false: the relay sends over a transport only where it listens on it. Turn sip.%s.enabled on, or give the peer another transport (the default is tls)" .domain $transport $transport $transport) }}
{{- end }}
{{- if and .username (not .passwordSecret) }}
{{- fail (printf "sip.peers: %s has a username but no passwordSecret: digest credentials need both (passwordSecret.secretName: a Secret you create holding the password)" .domain) }}
{{- end }}
{{- if and .passwordSecret (not .username) }}
{{- fail (printf "sip.peers: %s has a passwordSecret but no username: digest credentials need both" .domain) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedrelay.sipDir" -}}/etc/fedrelay/sip{{- end }}

{{/*
The SIP edge's certificate and key (tls.crt, tls.key), the peers' CAs (ca.crt) and the peers'
digest passwords (passwords/<domain>), in one projected volume of the relay pods (not the
loadtest Job's). Rendered when there is something to mount.
*/}}
{{- define "fedrelay.sipSources" -}}
{{- $s := .Values.sip }}
{{- $sources := list }}
{{- if $s.enabled }}
{{- if $s.tls.enabled }}
{{- $sources = append $sources (dict "secret" (dict "name" $s.tls.secretName "items" (list (dict "key" "tls.crt" "path" "tls.crt") (dict "key" "tls.key" "path" "tls.key")))) }}
{{- if $s.tls.caSecretName }}
{{- $sources = append $sources (dict "secret" (dict "name" $s.tls.caSecretName "items" (list (dict "key" $s.tls.caKey "path" "ca.crt")))) }}
{{- end }}
{{- end }}
{{- $bySecret := dict }}
{{- $order := list }}
{{- range $peer := $s.peers }}
{{- with $peer.passwordSecret }}
{{- if not (hasKey $bySecret .secretName) }}{{ $order = append $order .secretName }}{{ $_ := set $bySecret .secretName list }}{{ end }}
{{- $_ := set $bySecret .secretName (append (get $bySecret .secretName) (dict "key" (default $peer.domain .key) "path" (printf "passwords/%s" (lower $peer.domain)))) }}
{{- end }}
{{- end }}
{{- range $order }}
{{- $sources = append $sources (dict "secret" (dict "name" . "items" (get $bySecret .))) }}
{{- end }}
{{- end }}
{{- $sources | toJson }}
{{- end }}

{{- define "fedrelay.sipVolumeMounts" -}}
{{- if ne (include "fedrelay.sipSources" .) "[]" }}
- name: sip
  mountPath: {{ include "fedrelay.sipDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "fedrelay.sipVolumes" -}}
{{- $sources := include "fedrelay.sipSources" . }}
{{- if ne $sources "[]" }}
- name: sip
  projected:
    defaultMode: 288 # 0440
    sources:
      {{- $sources | fromJsonArray | toYaml | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Outgoing SIP traffic: networkPolicy.egress.sipPorts over TCP (with sip.tcp or sip.tls on) and
UDP (with sip.udp on), and the port of every sip.peers[].address over the peer's transport, as
a JSON list of {"port", "protocol"}.
*/}}
{{- define "fedrelay.sipEgressPorts" -}}
{{- $s := .Values.sip }}
{{- $seen := dict }}
{{- $ports := list }}
{{- $protocols := list }}
{{- if or $s.tcp.enabled $s.tls.enabled }}{{ $protocols = append $protocols "TCP" }}{{ end }}
{{- if $s.udp.enabled }}{{ $protocols = append $protocols "UDP" }}{{ end }}
{{- range $p := .Values.networkPolicy.egress.sipPorts }}
{{- range $protocols }}
{{- $k := printf "%d/%s" (int $p) . }}
{{- if not (hasKey $seen $k) }}{{ $_ := set $seen $k true }}{{ $ports = append $ports (dict "port" (int $p) "protocol" .) }}{{ end }}
{{- end }}
{{- end }}
{{- range $peer := $s.peers }}
{{- with $peer.address }}
{{- $p := regexFind "[0-9]+$" . | int }}
{{- $proto := ternary "UDP" "TCP" (eq (default "tls" $peer.transport) "udp") }}
{{- $k := printf "%d/%s" $p $proto }}
{{- if not (hasKey $seen $k) }}{{ $_ := set $seen $k true }}{{ $ports = append $ports (dict "port" $p "protocol" $proto) }}{{ end }}
{{- end }}
{{- end }}
{{- $ports | toJson }}
{{- end }}

{{/*
The XMPP edge's certificate and key (tls.crt, tls.key), the peers' CAs (ca.crt) and the dialback
secret (dialback-secret), in one projected volume of the relay pods (not the loadtest Job's).
*/}}
{{- define "fedrelay.xmppVolumeMounts" -}}
{{- if .Values.xmpp.enabled }}
- name: xmpp
  mountPath: {{ include "fedrelay.xmppDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "fedrelay.xmppVolumes" -}}
{{- $x := .Values.xmpp }}
{{- if $x.enabled }}
- name: xmpp
  projected:
    defaultMode: 288 # 0440
    sources:
      - secret:
          name: {{ $x.tls.secretName }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- if $x.tls.caSecretName }}
      - secret:
          name: {{ $x.tls.caSecretName }}
          items:
            - key: {{ $x.tls.caKey | quote }}
              path: ca.crt
      {{- end }}
      {{- if $x.dialbackSecret.secretName }}
      - secret:
          name: {{ $x.dialbackSecret.secretName }}
          items:
            - key: {{ $x.dialbackSecret.key | quote }}
              path: dialback-secret
      {{- end }}
{{- end }}
{{- end }}

{{/* The ports of xmpp.peers[].address, besides networkPolicy.egress.xmppPorts, as a JSON list. */}}
{{- define "fedrelay.xmppEgressPorts" -}}
{{- $ports := dict }}
{{- range .Values.networkPolicy.egress.xmppPorts }}{{ $_ := set $ports (toString (int .)) true }}{{ end }}
{{- range .Values.xmpp.peers }}
{{- with .address }}{{ $_ := set $ports (regexFind "[0-9]+$" .) true }}{{ end }}
{{- end }}
{{- keys $ports | sortAlpha | toJson }}
{{- end }}

{{/* The config file, secrets and TLS material, as the relay pods and the loadtest Job mount them. */}}
{{- define "fedrelay.volumeMounts" -}}
- name: config
  mountPath: /etc/fedrelay/relay.toml
  subPath: relay.toml
  readOnly: true
{{- if ne (include "fedrelay.secretSources" .) "[]" }}
- name: secrets
  mountPath: {{ include "fedrelay.secretsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.http.tls.existingSecret }}
- name: http-tls
  mountPath: /etc/fedrelay/tls
  readOnly: true
{{- end }}
{{- if and (include "fedrelay.clustered" .) .Values.cluster.tls.existingSecret }}
- name: cluster-tls
  mountPath: /etc/fedrelay/cluster
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "fedrelay.volumes" -}}
- name: config
  configMap:
    name: {{ include "fedrelay.fullname" . }}
{{- $sources := include "fedrelay.secretSources" . }}
{{- if ne $sources "[]" }}
- name: secrets
  projected:
    defaultMode: 288 # 0440
    sources:
      {{- $sources | fromJsonArray | toYaml | nindent 6 }}
{{- end }}
{{- if .Values.http.tls.existingSecret }}
- name: http-tls
  secret:
    secretName: {{ .Values.http.tls.existingSecret }}
    defaultMode: 288 # 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if and (include "fedrelay.clustered" .) .Values.cluster.tls.existingSecret }}
- name: cluster-tls
  secret:
    secretName: {{ .Values.cluster.tls.existingSecret }}
    defaultMode: 288 # 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      - key: ca.crt
        path: ca.crt
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/*
TLS material for the external Redis and etcd, mounted in the relay pods only (the loadtest Job
does not talk to them).
*/}}
{{- define "fedrelay.backendTlsVolumeMounts" -}}
{{- if include "fedrelay.redisTls" . }}
- name: redis-tls
  mountPath: {{ include "fedrelay.redisTlsDir" . }}
  readOnly: true
{{- end }}
{{- if include "fedrelay.etcdTls" . }}
- name: etcd-tls
  mountPath: {{ include "fedrelay.etcdTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "fedrelay.backendTlsVolumes" -}}
{{- if include "fedrelay.redisTls" . }}
- name: redis-tls
  secret:
    secretName: {{ .Values.externalRedis.tls.existingSecret }}
    defaultMode: 288 # 0440
    items:
      {{- include "fedrelay.backendTlsItems" .Values.externalRedis.tls | nindent 6 }}
{{- end }}
{{- if include "fedrelay.etcdTls" . }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.externalEtcd.tls.existingSecret }}
    defaultMode: 288 # 0440
    items:
      {{- include "fedrelay.backendTlsItems" .Values.externalEtcd.tls | nindent 6 }}
{{- end }}
{{- end }}
