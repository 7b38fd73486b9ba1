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
