{{/*
Common labels (Kubernetes recommended labels).
*/}}
{{- define "kubesg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: kubesg
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubesg
{{- end }}

{{/*
Selector labels of one component ("operator" or "agent").
*/}}
{{- define "kubesg.selectorLabels" -}}
app.kubernetes.io/name: kubesg
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The image reference.
*/}}
{{- define "kubesg.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The operator Service's DNS name, as agents dial it and as its certificate names it.
*/}}
{{- define "kubesg.operatorHost" -}}
kubesg-operator.{{ .Release.Namespace }}.svc
{{- end }}

{{/*
Whether this render keeps the operator and agent certificates it finds in the cluster
("true") or issues new ones (""): used by the Secrets and by the operator's restart annotation,
which must agree.
*/}}
{{- define "kubesg.keepCertificates" -}}
{{- $op := lookup "v1" "Secret" .Release.Namespace "kubesg-operator-tls" -}}
{{- $ag := lookup "v1" "Secret" .Release.Namespace "kubesg-agent-tls" -}}
{{- $opCA := lookup "v1" "Secret" .Release.Namespace "kubesg-operator-ca" -}}
{{- $agCA := lookup "v1" "Secret" .Release.Namespace "kubesg-agent-ca" -}}
{{- if and $op $ag $opCA $agCA (not .Values.tls.renewCertificates) -}}true{{- end -}}
{{- end }}

{{- /*
The operator Deployment's kubesg.io/certificates annotation: it changes, restarting the
operators, exactly when the chart issues new certificates (first install, renewal, rotation).
When the certificates are kept it keeps the value the running Deployment has, so an upgrade
that keeps them leaves the operators running (the install's value is a timestamp: the new
certificates' data is not visible from this template); with no Deployment to read, a hash of
the kept certificate stands in.
*/ -}}
{{- define "kubesg.certificatesAnnotation" -}}
{{- if include "kubesg.keepCertificates" . -}}
{{- $dep := lookup "apps/v1" "Deployment" .Release.Namespace "kubesg-operator" -}}
{{- $running := "" -}}
{{- if $dep -}}
{{- $running = index ($dep.spec.template.metadata.annotations | default dict) "kubesg.io/certificates" | default "" -}}
{{- end -}}
{{- $running | default ((lookup "v1" "Secret" .Release.Namespace "kubesg-operator-tls").data | toJson | sha256sum | trunc 16) -}}
{{- else -}}
{{- now | date "20060102T150405Z" -}}
{{- end -}}
{{- end }}

